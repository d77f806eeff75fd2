#include "agent.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <future>
#include <random>
#include <sstream>

#include "connection.h"
#include "wire.h"

namespace tandem::transfer {

// ---------------------------------------------------------------------------------------------------
// Small helpers

const char* backendName(Backend b) {
  switch (b) {
    case Backend::Shm: return "shm";
    case Backend::Tcp: return "tcp";
    case Backend::CudaIpc: return "cuda-ipc";
    case Backend::Nccl: return "nccl";
    case Backend::Ucx: return "ucx";
  }
  return "unknown";
}

bool parseBackend(const std::string& name, Backend& out) {
  static const std::pair<const char*, Backend> names[] = {
      {"shm", Backend::Shm}, {"tcp", Backend::Tcp}, {"cuda-ipc", Backend::CudaIpc},
      {"nccl", Backend::Nccl}, {"ucx", Backend::Ucx}};
  for (const auto& [n, b] : names) {
    if (name == n) {
      out = b;
      return true;
    }
  }
  return false;
}

namespace {

std::string errnoText(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

std::string readFirstLine(const char* path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// Same-host key: agents that share it can map each other's memfds through /proc and use CUDA IPC.
std::string makeHostKey() {
  std::string boot = readFirstLine("/proc/sys/kernel/random/boot_id");
  char ns[128] = {0};
  ssize_t n = readlink("/proc/self/ns/pid", ns, sizeof(ns) - 1);
  if (n > 0) ns[n] = 0;
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  return boot + "/" + ns + "/" + host;
}

uint64_t randomIncarnation() {
  std::random_device rd;
  uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  return v ? v : 1;
}

const char* opName(Op op) { return op == Op::Write ? "WRITE" : "READ"; }

bool isHostKind(MemKind k) { return k != MemKind::Device; }

}  // namespace

HostMapping::~HostMapping() {
  // cuMemHostUnregister is done by the agent (progress thread) before the last reference drops.
  if (base && base != MAP_FAILED) munmap(base, size);
  if (memfd >= 0) ::close(memfd);
}

// ---------------------------------------------------------------------------------------------------
// Connections

namespace {

std::vector<unsigned char> helloPayload(uint64_t incarnation, const std::string& name) {
  std::vector<unsigned char> out(sizeof(uint64_t) + sizeof(uint16_t) + name.size());
  std::memcpy(out.data(), &incarnation, 8);
  uint16_t len = static_cast<uint16_t>(name.size());
  std::memcpy(out.data() + 8, &len, 2);
  std::memcpy(out.data() + 10, name.data(), name.size());
  return out;
}

bool parseHello(const std::vector<unsigned char>& p, uint64_t& incarnation, std::string& name) {
  if (p.size() < 10) return false;
  std::memcpy(&incarnation, p.data(), 8);
  uint16_t len;
  std::memcpy(&len, p.data() + 8, 2);
  if (p.size() != 10u + len) return false;
  name.assign(reinterpret_cast<const char*>(p.data() + 10), len);
  return true;
}

// Connects with a deadline (a blackholed address must not stall a thread for minutes).
int connectWithTimeout(const sockaddr* addr, socklen_t len, int family, int timeoutMs, std::string& error) {
  int fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    error = errnoText("socket");
    return -1;
  }
  int r = ::connect(fd, addr, len);
  if (r < 0 && errno != EINPROGRESS) {
    error = errnoText("connect");
    ::close(fd);
    return -1;
  }
  if (r < 0) {
    pollfd p{fd, POLLOUT, 0};
    int n = ::poll(&p, 1, timeoutMs);
    int soError = 0;
    socklen_t sl = sizeof(soError);
    if (n <= 0) {
      error = n == 0 ? "connect timed out" : errnoText("poll");
      ::close(fd);
      return -1;
    }
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &sl);
    if (soError) {
      error = std::string("connect: ") + std::strerror(soError);
      ::close(fd);
      return -1;
    }
  }
  int flags = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  if (family == AF_INET || family == AF_INET6) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
  }
  return fd;
}

sockaddr_un abstractAddress(const std::string& name, socklen_t& len) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  a.sun_path[0] = '\0';
  size_t n = std::min(name.size(), sizeof(a.sun_path) - 2);
  std::memcpy(a.sun_path + 1, name.data(), n);
  len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n);
  return a;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Agent: lifetime

Agent::Agent(AgentOptions options, AgentCallbacks callbacks, const CudaDriver* cuda)
    : options_(std::move(options)), callbacks_(std::move(callbacks)), cuda_(cuda) {
  incarnation_ = randomIncarnation();
  hostKey_ = makeHostKey();
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(incarnation_));
  unixName_ = std::string("tandem.") + hex;
  startListening();
  if (!options_.ucp.empty()) {
    ucx_ = UcxBackend::create(options_.ucp, ucxReason_);
  } else {
    ucxReason_ = "no libucp search path was given";
  }
  if (!cuda_ || !cuda_->available) {
    ncclReason_ = std::string("CUDA unavailable: ") + (cuda_ ? cuda_->reason : "not probed");
  } else if (options_.nccl.empty()) {
    ncclReason_ = "no libnccl search path was given";
  } else {
    const nccl::NcclLibrary& lib = nccl::loadNcclLibrary(options_.nccl);
    if (lib.available) {
      nccl_ = &lib;
    } else {
      ncclReason_ = "NCCL unavailable: " + lib.reason;
    }
  }
  progress_ = std::make_unique<WorkQueue>("tandem-xfer");
  progress_->setPoll([this] { return pollInflight(); });
  // Posts often come in runs (a request's blocks, a bench loop): spinning briefly between them saves
  // the thread's wake-up on each. TANDEM_PROGRESS_SPIN_US overrides (0: never spin).
  {
    long spinUs = 50;
    if (const char* env = std::getenv("TANDEM_PROGRESS_SPIN_US")) spinUs = std::max(0L, std::strtol(env, nullptr, 10));
    spin_ = std::chrono::microseconds(spinUs);
    progress_->setSpin(spin_);
  }
  // TANDEM_CUDA_BATCH=0: cuda-ipc plans never use batched copies. TANDEM_CUDA_COPY=kernel|engine|batch: plans
  // use that strategy wherever it can run, without trials.
  if (const char* env = std::getenv("TANDEM_CUDA_BATCH")) copyBatchOn_ = std::strcmp(env, "0") != 0;
  if (const char* env = std::getenv("TANDEM_CUDA_COPY")) {
    std::string v = env;
    forcedCopy_ = v == "kernel" ? Plan::kKernel : v == "engine" ? Plan::kCopyEngine : v == "batch" ? Plan::kBatch : -1;
  }
  // TANDEM_DIRECT_POSTS=0: every cuda-ipc post goes through the progress thread (see tryDirectCuda).
  if (const char* env = std::getenv("TANDEM_DIRECT_POSTS")) directPostsOn_ = std::strcmp(env, "0") != 0;
  // TANDEM_STREAM_COMMIT=0: the host commits cuda-ipc notifications to polling targets once the copy is seen
  // done, instead of the stream right after the copy (see streamCommit).
  if (const char* env = std::getenv("TANDEM_STREAM_COMMIT")) streamCommitOn_ = std::strcmp(env, "0") != 0;
  acceptThread_ = std::thread([this] { acceptLoop(); });
  timeoutThread_ = std::thread([this] {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!closing_) {
      timeoutWake_.wait_for(lock, std::chrono::milliseconds(50));
      auto now = std::chrono::steady_clock::now();
      std::vector<std::pair<uint64_t, std::string>> expired;
      for (auto it = pending_.begin(); it != pending_.end();) {
        if (it->second.deadline <= now) {
          expired.push_back({it->first, it->second.peer->d.name});
          it = pending_.erase(it);
        } else {
          ++it;
        }
      }
      lock.unlock();
      for (auto& [token, peerName] : expired) {
        callbacks_.completed(token, false, "TANDEM_TIMEOUT",
                             "peer '" + peerName + "' did not answer within " + std::to_string(options_.timeoutMs) + " ms");
      }
      lock.lock();
    }
  });
}

Agent::~Agent() { close(); }

void Agent::startListening() {
  if (pipe2(wakeFd_, O_CLOEXEC) != 0) throw AgentError{"TANDEM_INTERNAL", errnoText("pipe2")};
  socklen_t ulen;
  sockaddr_un ua = abstractAddress(unixName_, ulen);
  unixFd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (unixFd_ < 0 || ::bind(unixFd_, reinterpret_cast<sockaddr*>(&ua), ulen) != 0 || ::listen(unixFd_, 64) != 0) {
    throw AgentError{"TANDEM_INTERNAL", errnoText("unix socket")};
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  std::string port = std::to_string(options_.tcpPort);
  int gai = getaddrinfo(options_.tcpHost.c_str(), port.c_str(), &hints, &res);
  if (gai != 0 || !res) {
    throw AgentError{"TANDEM_BAD_ARGUMENT", "cannot listen on " + options_.tcpHost + ": " + gai_strerror(gai)};
  }
  tcpFd_ = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(tcpFd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (tcpFd_ < 0 || ::bind(tcpFd_, res->ai_addr, res->ai_addrlen) != 0 || ::listen(tcpFd_, 64) != 0) {
    std::string e = errnoText("tcp listen");
    freeaddrinfo(res);
    throw AgentError{"TANDEM_BAD_ARGUMENT", "cannot listen on " + options_.tcpHost + ":" + port + ": " + e};
  }
  freeaddrinfo(res);
  sockaddr_storage bound{};
  socklen_t blen = sizeof(bound);
  getsockname(tcpFd_, reinterpret_cast<sockaddr*>(&bound), &blen);
  tcpPort_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                               : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
}

void Agent::close() {
  if (closing_.exchange(true)) return;
  timeoutWake_.notify_all();
  // Reject everything still waiting on a peer.
  std::map<uint64_t, Pending> pending;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    pending.swap(pending_);
  }
  for (auto& [token, p] : pending) callbacks_.completed(token, false, "TANDEM_DISPOSED", "the transfer agent was disposed");
  // Wake the accept loop and every reader.
  if (wakeFd_[1] >= 0) {
    char c = 1;
    (void)!::write(wakeFd_[1], &c, 1);
  }
  std::vector<std::shared_ptr<Connection>> conns;
  std::vector<std::shared_ptr<Peer>> peers;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    conns = connections_;
    for (auto& [name, peer] : peers_) peers.push_back(peer);
  }
  for (auto& c : conns) c->shutdown();
  for (auto& p : peers) {
    std::lock_guard<std::mutex> lock(p->mutex);
    p->dead = true;
    if (p->deadReason.empty()) p->deadReason = "the transfer agent was disposed";
    p->connecting = false;
    p->connected.notify_all();
  }
  if (acceptThread_.joinable()) acceptThread_.join();
  if (timeoutThread_.joinable()) timeoutThread_.join();
  {
    std::lock_guard<std::mutex> lock(readersMutex_);
    for (auto& t : readers_) {
      if (t.joinable()) t.join();
    }
    readers_.clear();
  }
  for (auto& p : peers) closeNcclLinks(*p);
  // Jobs still queued see closing_ and reject; then release CUDA state on the progress thread.
  progress_->post([this] { releaseCuda(); });
  progress_->stop();
  ucx_.reset();  // fails whatever UCX still had in flight, joins its thread
  if (unixFd_ >= 0) ::close(unixFd_);
  if (tcpFd_ >= 0) ::close(tcpFd_);
  if (wakeFd_[0] >= 0) ::close(wakeFd_[0]);
  if (wakeFd_[1] >= 0) ::close(wakeFd_[1]);
  unixFd_ = tcpFd_ = wakeFd_[0] = wakeFd_[1] = -1;
  {
    std::lock_guard<std::mutex> lock(inboxMutex_);
    inboxes_.clear();  // their rings' memfds and mappings (a sender's own mapping outlives this)
  }
  std::lock_guard<std::mutex> lock(mutex_);
  peers_.clear();
  connections_.clear();
  regions_.clear();
}


std::string Agent::ucxPeerKey(const Peer& peer) {
  return peer.d.name + "#" + std::to_string(peer.d.incarnation);
}

uint32_t Agent::backends() const {
  uint32_t b = kBackendShm | kBackendTcp;
  if (ucx_) b |= kBackendUcx;
  if (cuda_ && cuda_->available) b |= kBackendCudaIpc;
  if (nccl_) b |= kBackendNccl;
  return b;
}

// ---------------------------------------------------------------------------------------------------
// CUDA helpers (progress thread)

void Agent::checkCuda(CUresult r, const char* what) {
  if (r == CUDA_SUCCESS) return;
  throw AgentError{r == CUDA_ERROR_OUT_OF_MEMORY ? "TANDEM_OUT_OF_MEMORY" : "TANDEM_CUDA_ERROR",
                   std::string(what) + ": " + cuda_->describe(r)};
}

void Agent::setDevice(int device) {
  if (!cuda_ || !cuda_->available) throw AgentError{"TANDEM_BACKEND_UNAVAILABLE", "CUDA unavailable"};
  if (device == currentDevice_) return;
  auto it = contexts_.find(device);
  if (it == contexts_.end()) {
    CUdevice dev;
    CUcontext ctx;
    checkCuda(cuda_->cuDeviceGet(&dev, device), "cuDeviceGet");
    checkCuda(cuda_->cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    it = contexts_.emplace(device, ctx).first;
  }
  checkCuda(cuda_->cuCtxSetCurrent(it->second), "cuCtxSetCurrent");
  currentDevice_ = device;
}

bool Agent::pollInflight() {
  // Called on the progress thread between jobs; completes every finished entry (any order: entries
  // on different peers' streams finish independently).
  try {
    for (auto it = inflight_.begin(); it != inflight_.end();) {
      setDevice(it->device);
      CUresult r = cuda_->cuEventQuery(it->event);
      if (r == CUDA_ERROR_NOT_READY) {
        ++it;
        continue;
      }
      auto done = std::move(it->done);
      float ms = -1;
      if (it->start) {
        if (r == CUDA_SUCCESS) cuda_->cuEventElapsedTime(&ms, it->start, it->event);
        cuda_->cuEventDestroy(it->start);
        cuda_->cuEventDestroy(it->event);  // timing events are not pooled
      } else {
        giveEvent(it->device, it->event);
      }
      it = inflight_.erase(it);
      done(r, ms);
    }
  } catch (const AgentError&) {
    // setDevice failed: the context is gone; nothing more can complete.
    return false;
  }
  return !inflight_.empty();
}

void Agent::releasePeer(Peer& peer) {
  const bool otherProcess = peer.d.pid != static_cast<uint32_t>(getpid());
  const bool cuda = cuda_ && cuda_->available && !contexts_.empty();
  CUstream stream = nullptr;
  {
    std::lock_guard<std::mutex> lock(peer.mutex);  // no more copies issued on the caller's thread
    ++peer.cudaEpoch;
    std::swap(stream, peer.stream);
  }
  // Work already issued to the peer reads or writes its memory through these mappings: let it finish.
  if (stream && cuda) {
    setDevice(peer.streamDevice);
    cuda_->cuStreamSynchronize(stream);
    cuda_->cuStreamDestroy(stream);
  }
  // No stream of ours writes into the peer's ring any more (the stream is gone, the epoch stops direct posts).
  if (peer.ringRegisteredOn >= 0 && cuda && peer.ring) {
    int device;
    {
      std::lock_guard<std::mutex> lock(peer.mutex);
      peer.ringOnDevice = 0;
      device = peer.ringRegisteredOn;
      peer.ringRegisteredOn = -1;
    }
    setDevice(device);
    cuda_->cuMemHostUnregister(peer.ring->mapping());
  }
  for (auto& r : peer.regions) {
    if (r.opened && r.openedOn >= 0 && otherProcess && cuda) {
      setDevice(r.openedOn);
      cuda_->cuIpcCloseMemHandle(r.opened - r.d.ipcOffset);
    }
    r.opened = 0;
    std::lock_guard<std::mutex> lock(peer.mutex);  // against tryInlineShm's copies
    if (r.mapped && r.mappedSize && otherProcess) munmap(r.mapped, r.mappedSize);
    r.mapped = nullptr;
    r.mappedSize = 0;
  }
}

void Agent::releaseRetired() {
  std::vector<std::shared_ptr<Peer>> retired;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    retired.swap(retired_);
  }
  for (auto& p : retired) releasePeer(*p);
}

void Agent::releaseCuda() {
  while (cuda_ && cuda_->available && pollInflight()) std::this_thread::yield();
  std::vector<std::pair<int, CUevent>> pool;
  {
    std::lock_guard<std::mutex> lock(eventMutex_);
    pool.swap(eventPool_);
  }
  for (auto& [device, event] : pool) {
    setDevice(device);
    cuda_->cuEventDestroy(event);
  }
  releaseRetired();
  if (!cuda_ || !cuda_->available || contexts_.empty()) {
    // No CUDA state to free; shm mappings of peers still loaded go all the same.
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [n, p] : peers_) releasePeer(*p);
    return;
  }
  std::vector<std::shared_ptr<Peer>> peers;
  std::vector<std::shared_ptr<Region>> regions;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [n, p] : peers_) peers.push_back(p);
    for (auto& [id, r] : regions_) regions.push_back(r);
  }
  for (auto& p : peers) releasePeer(*p);
  for (auto& r : regions) {
    if (r->ownsDevice && r->dev) {
      setDevice(r->device);
      cuda_->cuMemFree(r->dev);
      r->dev = 0;
    }
    if (r->mapping && r->mapping->cudaRegistered) {
      cuda_->cuMemHostUnregister(r->mapping->base);
      r->mapping->cudaRegistered = false;
    }
  }
  sweepChunkTables(true);
  for (auto& [device, k] : kernels_) {
    if (k.module) {
      setDevice(device);
      cuda_->cuModuleUnload(k.module);
    }
  }
  kernels_.clear();
  cuda_->cuCtxSetCurrent(nullptr);
  for (auto& [device, ctx] : contexts_) {
    CUdevice dev;
    if (cuda_->cuDeviceGet(&dev, device) == CUDA_SUCCESS) cuda_->cuDevicePrimaryCtxRelease(dev);
  }
  contexts_.clear();
  currentDevice_ = -1;
}

// ---------------------------------------------------------------------------------------------------
// Registration

std::shared_ptr<Region> Agent::registerHost(unsigned char* data, uint64_t size) {
  if (!data || size == 0) throw AgentError{"TANDEM_BAD_ARGUMENT", "cannot register an empty host buffer"};
  auto r = std::make_shared<Region>();
  r->kind = MemKind::Host;
  r->host = data;
  r->size = size;
  std::lock_guard<std::mutex> lock(mutex_);
  r->id = nextRegionId_++;
  r->desc.id = r->id;
  r->desc.kind = r->kind;
  r->desc.size = size;
  r->desc.address = reinterpret_cast<uint64_t>(data);
  if (ucx_) {
    try {
      r->desc.ucxRkey = ucx_->registerMemory(r->id, data, size);
    } catch (const AgentError&) {
      r->desc.ucxRkey.clear();  // UCX cannot reach this region; the other backends still can
    }
  }
  regions_[r->id] = r;
  return r;
}

std::shared_ptr<Region> Agent::allocShared(uint64_t size, bool pinned) {
  if (size == 0) throw AgentError{"TANDEM_BAD_ARGUMENT", "cannot allocate an empty region"};
  auto mapping = std::make_shared<HostMapping>();
  std::string label = "tandem:" + options_.name;
  mapping->memfd = static_cast<int>(syscall(SYS_memfd_create, label.c_str(), 0));
  if (mapping->memfd < 0) throw AgentError{"TANDEM_INTERNAL", errnoText("memfd_create")};
  if (ftruncate(mapping->memfd, static_cast<off_t>(size)) != 0) {
    throw AgentError{"TANDEM_OUT_OF_MEMORY", errnoText("ftruncate of shared region")};
  }
  mapping->base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, mapping->memfd, 0);
  if (mapping->base == MAP_FAILED) {
    mapping->base = nullptr;
    throw AgentError{"TANDEM_OUT_OF_MEMORY", errnoText("mmap of shared region")};
  }
  mapping->size = size;
  auto r = std::make_shared<Region>();
  r->kind = pinned ? MemKind::Pinned : MemKind::Shared;
  r->host = static_cast<unsigned char*>(mapping->base);
  r->size = size;
  r->mapping = mapping;
  if (pinned) {
    onProgress([&] {
      setDevice(0);
      checkCuda(cuda_->cuMemHostRegister(mapping->base, size, CU_MEMHOSTREGISTER_PORTABLE), "cuMemHostRegister");
      mapping->cudaRegistered = true;
      return 0;
    });
  }
  std::lock_guard<std::mutex> lock(mutex_);
  r->id = nextRegionId_++;
  r->desc.id = r->id;
  r->desc.kind = r->kind;
  r->desc.size = size;
  r->desc.address = reinterpret_cast<uint64_t>(r->host);
  r->desc.memfd = mapping->memfd;
  if (ucx_) {
    try {
      r->desc.ucxRkey = ucx_->registerMemory(r->id, r->host, size);
    } catch (const AgentError&) {
      r->desc.ucxRkey.clear();
    }
  }
  regions_[r->id] = r;
  return r;
}

std::shared_ptr<Region> Agent::registerDevice(int device, CUdeviceptr ptr, uint64_t size, bool owns) {
  if (!cuda_ || !cuda_->available) {
    throw AgentError{"TANDEM_CUDA_UNAVAILABLE", std::string("CUDA unavailable: ") + (cuda_ ? cuda_->reason : "not probed")};
  }
  if (device < 0 || device >= cuda_->deviceCount) {
    throw AgentError{"TANDEM_BAD_ARGUMENT", "no CUDA device " + std::to_string(device)};
  }
  if (!ptr || !size) throw AgentError{"TANDEM_BAD_ARGUMENT", "device region needs an address and a size"};
  auto r = std::make_shared<Region>();
  r->kind = MemKind::Device;
  r->device = device;
  r->dev = ptr;
  r->size = size;
  r->ownsDevice = owns;
  r->desc.kind = MemKind::Device;
  r->desc.device = static_cast<int16_t>(device);
  r->desc.size = size;
  r->desc.address = ptr;
  onProgress([&] {
    setDevice(device);
    // The range must lie inside one allocation of this device; the IPC handle names that allocation.
    CUdeviceptr base = 0;
    size_t allocSize = 0;
    CUresult res = cuda_->cuMemGetAddressRange(&base, &allocSize, ptr);
    if (res != CUDA_SUCCESS) {
      throw AgentError{"TANDEM_BAD_ARGUMENT", "address 0x" + [&] {
        std::ostringstream o;
        o << std::hex << ptr;
        return o.str();
      }() + " is not device memory of this process: " + cuda_->describe(res)};
    }
    if (ptr + size > base + allocSize) {
      throw AgentError{"TANDEM_OUT_OF_BOUNDS", "device region of " + std::to_string(size) + " bytes runs past the end of its allocation (" +
                                                   std::to_string(base + allocSize - ptr) + " bytes left)"};
    }
    int ordinal = -1;
    if (cuda_->cuPointerGetAttribute(&ordinal, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr) == CUDA_SUCCESS && ordinal != device) {
      throw AgentError{"TANDEM_BAD_ARGUMENT", "address belongs to CUDA device " + std::to_string(ordinal) + ", not " + std::to_string(device)};
    }
    CUipcMemHandle handle{};
    if (cuda_->cuIpcGetMemHandle(&handle, base) == CUDA_SUCCESS) {
      r->desc.hasIpcHandle = true;
      r->desc.ipcOffset = ptr - base;
      std::memcpy(r->desc.ipcHandle, handle.reserved, sizeof(handle.reserved));
    }
    return 0;
  });
  std::lock_guard<std::mutex> lock(mutex_);
  r->id = nextRegionId_++;
  r->desc.id = r->id;
  regions_[r->id] = r;
  return r;
}

std::shared_ptr<Region> Agent::allocDevice(int device, uint64_t size) {
  if (!cuda_ || !cuda_->available) {
    throw AgentError{"TANDEM_CUDA_UNAVAILABLE", std::string("CUDA unavailable: ") + (cuda_ ? cuda_->reason : "not probed")};
  }
  CUdeviceptr ptr = onProgress([&] {
    setDevice(device);
    CUdeviceptr p = 0;
    checkCuda(cuda_->cuMemAlloc(&p, size), "cuMemAlloc");
    return p;
  });
  try {
    return registerDevice(device, ptr, size, true);
  } catch (...) {
    onProgress([&] {
      cuda_->cuMemFree(ptr);
      return 0;
    });
    throw;
  }
}

void Agent::deregister(uint32_t id) {
  std::shared_ptr<Region> r;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = regions_.find(id);
    if (it == regions_.end()) throw AgentError{"TANDEM_NOT_REGISTERED", "region " + std::to_string(id) + " is not registered"};
    r = it->second;
    regions_.erase(it);
  }
  if (ucx_ && !r->desc.ucxRkey.empty()) ucx_->deregisterMemory(id);
  // Peers can no longer open it; JS views keep the mapping itself until they are collected.
  if (r->mapping && r->mapping->memfd >= 0) {
    ::close(r->mapping->memfd);
    r->mapping->memfd = -1;
  }
  // Device memory and pinned registrations are released on the progress thread, after any transfer
  // already queued there has finished with them.
  if ((r->ownsDevice && r->dev) || (r->mapping && r->mapping->cudaRegistered)) {
    onProgress([&] {
      if (r->ownsDevice && r->dev) {
        setDevice(r->device);
        cuda_->cuMemFree(r->dev);
        r->dev = 0;
      }
      if (r->mapping && r->mapping->cudaRegistered) {
        setDevice(0);
        cuda_->cuMemHostUnregister(r->mapping->base);
        r->mapping->cudaRegistered = false;
      }
      return 0;
    });
  }
}

std::shared_ptr<Region> Agent::region(uint32_t id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = regions_.find(id);
  return it == regions_.end() ? nullptr : it->second;
}

// ---------------------------------------------------------------------------------------------------
// Metadata and peers

std::vector<unsigned char> Agent::metadata() {
  AgentDescriptor d;
  d.name = options_.name;
  d.incarnation = incarnation_;
  d.pid = static_cast<uint32_t>(getpid());
  d.hostKey = hostKey_;
  d.unixSocket = unixName_;
  d.tcpHost = options_.tcpHost;
  d.tcpPort = tcpPort_;
  d.backends = backends();
  if (ucx_) d.ucxAddress = ucx_->workerAddress();
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [id, r] : regions_) d.regions.push_back(r->desc);
  return encodeMetadata(d);
}

std::shared_ptr<Peer> Agent::loadRemote(const unsigned char* data, size_t size) {
  AgentDescriptor d;
  try {
    d = decodeMetadata(data, size);
  } catch (const MetadataError& e) {
    throw AgentError{e.code, e.message};
  }
  if (d.incarnation == incarnation_) throw AgentError{"TANDEM_BAD_ARGUMENT", "cannot load an agent's own metadata as a peer"};
  std::shared_ptr<Peer> old;
  auto peer = std::make_shared<Peer>();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = peers_.find(d.name);
    if (it != peers_.end()) {
      if (it->second->d.incarnation == d.incarnation && !it->second->removed) {
        // Same peer, possibly with more regions registered since: refresh the region list only when
        // nothing was resolved yet would be racy; keep the existing peer and append new regions.
        auto& existing = it->second;
        for (const auto& r : d.regions) {
          if (!existing->regionIndex.count(r.id)) {
            // Appending is safe: plans hold indices, and vectors of RemoteRegion are only resized
            // under mutex_ before any plan refers to the new entries.
            std::lock_guard<std::mutex> peerLock(existing->mutex);
            existing->regionIndex[r.id] = existing->regions.size();
            existing->regions.push_back(RemoteRegion{r});
          }
        }
        return existing;
      }
      old = it->second;  // a restarted peer with the same name: a new peer
    }
    peer->d = d;
    peer->sameHost = d.hostKey == hostKey_;
    peer->regions.reserve(d.regions.size() + 64);
    for (const auto& r : d.regions) {
      peer->regionIndex[r.id] = peer->regions.size();
      peer->regions.push_back(RemoteRegion{r});
    }
    peers_[d.name] = peer;
  }
  if (old) markDead(old, "peer '" + old->d.name + "' was replaced by a new incarnation");
  if (ucx_ && !peer->d.ucxAddress.empty()) ucx_->connect(ucxPeerKey(*peer), peer->d.ucxAddress);
  std::lock_guard<std::mutex> lock(readersMutex_);
  readers_.emplace_back([this, peer] { readOutbound(peer); });
  return peer;
}

bool Agent::removeRemote(const std::string& name) {
  std::shared_ptr<Peer> peer;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = peers_.find(name);
    if (it == peers_.end()) return false;
    peer = it->second;
    peers_.erase(it);
  }
  peer->removed = true;
  markDead(peer, "peer '" + name + "' was removed");
  return true;
}

std::shared_ptr<Peer> Agent::peer(const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = peers_.find(name);
  return it == peers_.end() ? nullptr : it->second;
}

void Agent::markDead(const std::shared_ptr<Peer>& peer, const std::string& reason) {
  std::shared_ptr<Connection> conn;
  {
    std::lock_guard<std::mutex> lock(peer->mutex);
    if (!peer->dead) {
      peer->dead = true;
      peer->deadReason = reason;
    }
    peer->connecting = false;
    conn = peer->conn;
    peer->connected.notify_all();
  }
  if (conn) conn->shutdown();
  if (ucx_ && !peer->d.ucxAddress.empty() && !closing_) ucx_->disconnect(ucxPeerKey(*peer));
  closeNcclLinks(*peer);
  // Nothing more can be posted to a dead peer: close our mappings of its memory on the progress
  // thread, after any job of its that is already queued there (dispose releases the rest).
  if (!closing_) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      retired_.push_back(peer);
    }
    progress_->post([this] { releaseRetired(); });
  }
  std::vector<std::pair<uint64_t, Pending>> failed;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = pending_.begin(); it != pending_.end();) {
      if (it->second.peer == peer) {
        failed.emplace_back(it->first, std::move(it->second));
        it = pending_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& [token, p] : failed) {
    callbacks_.completed(token, false, "TANDEM_REMOTE_DISCONNECTED",
                         "peer '" + peer->d.name + "' disconnected during " + opName(p.plan->op) + " of " +
                             std::to_string(p.plan->pieces.size()) + " pieces (" + reason + ")");
  }
}

std::shared_ptr<Connection> Agent::waitConnected(const std::shared_ptr<Peer>& peer, std::string& error) {
  std::unique_lock<std::mutex> lock(peer->mutex);
  bool ready = peer->connected.wait_for(lock, std::chrono::milliseconds(options_.timeoutMs),
                                        [&] { return !peer->connecting || peer->dead; });
  if (peer->dead) {
    error = peer->deadReason;
    return nullptr;
  }
  if (!ready || !peer->conn) {
    error = "could not connect to peer '" + peer->d.name + "' within " + std::to_string(options_.timeoutMs) + " ms";
    return nullptr;
  }
  return peer->conn;
}

// ---------------------------------------------------------------------------------------------------
// Threads: accept, inbound service, outbound answers

void Agent::acceptLoop() {
  pthread_setname_np(pthread_self(), "tandem-accept");
  for (;;) {
    pollfd fds[3] = {{unixFd_, POLLIN, 0}, {tcpFd_, POLLIN, 0}, {wakeFd_[0], POLLIN, 0}};
    int n = ::poll(fds, 3, -1);
    if (closing_) return;
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    for (int i = 0; i < 2; ++i) {
      if (!(fds[i].revents & POLLIN)) continue;
      int fd = ::accept4(fds[i].fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      if (i == 1) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
      }
      auto conn = std::make_shared<Connection>(fd);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        connections_.push_back(conn);
      }
      std::lock_guard<std::mutex> lock(readersMutex_);
      if (closing_) {
        conn->shutdown();
        return;
      }
      readers_.emplace_back([this, conn] { serveInbound(conn); });
    }
  }
}

namespace {

struct WirePiece {
  uint64_t offset;
  uint64_t length;
};

}  // namespace

void Agent::serveInbound(std::shared_ptr<Connection> conn) {
  pthread_setname_np(pthread_self(), "tandem-serve");
  std::string error;
  Header h{};
  std::vector<unsigned char> payload;
  // Handshake: the initiator names itself first.
  if (!recvAll(conn->fd, &h, sizeof(h), error) || h.type != static_cast<uint32_t>(Msg::Hello) || h.length > 4096) {
    conn->shutdown();
    return;
  }
  payload.resize(h.length);
  if (!recvAll(conn->fd, payload.data(), payload.size(), error) ||
      !parseHello(payload, conn->peerIncarnation, conn->peerName)) {
    conn->shutdown();
    return;
  }
  // Polled notifications: an inbox for this connection, with a ring in shared memory when the initiator
  // is on this host (it came over the unix socket). The HelloAck names the ring's fd (plus one; 0: none).
  uint32_t ringFd = 0;
  if (options_.pollNotifications) {
    auto inbox = std::make_shared<Inbox>();
    inbox->from = conn->peerName;
    sockaddr_storage local{};
    socklen_t localLen = sizeof(local);
    if (getsockname(conn->fd, reinterpret_cast<sockaddr*>(&local), &localLen) == 0 && local.ss_family == AF_UNIX) {
      std::string ringError;
      inbox->ring = NotifyRing::create(NotifyRing::kCapacity, ringError);  // without one, the socket carries all
      if (inbox->ring) ringFd = static_cast<uint32_t>(inbox->ring->memfd()) + 1;
    }
    conn->inbox = inbox;
    std::lock_guard<std::mutex> lock(inboxMutex_);
    inboxes_.push_back(std::move(inbox));
  }
  struct CloseInbox {
    Connection& conn;
    ~CloseInbox() {
      if (conn.inbox) conn.inbox->closed.store(true, std::memory_order_release);
    }
  } closeInbox{*conn};
  auto ack = helloPayload(incarnation_, options_.name);
  if (!sendMessage(*conn, Msg::HelloAck, ringFd, h.seq, ack.data(), ack.size(), error)) {
    conn->shutdown();
    return;
  }

  InboundNccl nccl;
  while (!closing_) {
    spinUntilReadable(conn->fd, spin_);
    if (!recvAll(conn->fd, &h, sizeof(h), error)) break;
    Msg type = static_cast<Msg>(h.type);
    if (type == Msg::NcclInit || type == Msg::NcclPlan || type == Msg::NcclPost) {
      if (!serveNccl(*conn, conn, h, nccl, error)) break;
      continue;
    }
    if (type == Msg::Notify) {
      if (h.length > (64u << 20)) break;  // a corrupt stream; stop serving it
      std::vector<unsigned char> message(h.length);
      if (!recvAll(conn->fd, message.data(), message.size(), error)) break;
      if (h.aux == kNotifySkip) {
        // A numbered notification that will not come (its transfer failed): later ones need not wait.
        if (conn->inbox && h.seq != 0) conn->inbox->push(h.seq, {}, true);
        continue;
      }
      delivered(*conn, h.seq, std::move(message));
      continue;
    }
    if (type != Msg::WriteData && type != Msg::ReadRequest) break;  // protocol violation
    uint32_t counts[2];
    if (h.length < sizeof(counts) || !recvAll(conn->fd, counts, sizeof(counts), error)) break;
    uint64_t pieceCount = counts[0];
    uint64_t notifLen = type == Msg::WriteData ? counts[1] : 0;
    if (pieceCount * sizeof(WirePiece) + sizeof(counts) > h.length) break;
    std::vector<WirePiece> pieces(pieceCount);
    if (!recvAll(conn->fd, pieces.data(), pieces.size() * sizeof(WirePiece), error)) break;
    uint64_t dataBytes = h.length - sizeof(counts) - pieces.size() * sizeof(WirePiece);

    // Validate against our own registration: the initiator's checks are not trusted.
    std::string problem;
    std::shared_ptr<Region> region = this->region(h.aux);
    uint64_t total = 0;
    if (!region) {
      problem = "region " + std::to_string(h.aux) + " is not registered at '" + options_.name + "'";
    } else if (!isHostKind(region->kind)) {
      problem = "region " + std::to_string(h.aux) + " is device memory; tcp moves host memory only";
    } else {
      for (size_t i = 0; i < pieces.size() && problem.empty(); ++i) {
        if (pieces[i].length == 0 || pieces[i].offset > region->size || pieces[i].length > region->size - pieces[i].offset) {
          problem = "piece " + std::to_string(i) + " (offset " + std::to_string(pieces[i].offset) + ", length " +
                    std::to_string(pieces[i].length) + ") is outside region " + std::to_string(h.aux) + " of " +
                    std::to_string(region->size) + " bytes";
        }
        total += pieces[i].length;
      }
      if (problem.empty() && type == Msg::WriteData && total + notifLen != dataBytes) {
        problem = "WRITE payload size does not match its pieces";
      }
    }

    if (type == Msg::WriteData) {
      if (!problem.empty()) {
        // The refused WRITE's notification is not delivered, but a poller must hear its number is spent.
        bool carried = notifLen >= 8 && notifLen <= dataBytes && conn->inbox && conn->inbox->ring;
        if (!discard(conn->fd, dataBytes - (carried ? notifLen : 0), error)) break;
        if (carried) {
          std::vector<unsigned char> notif(notifLen);
          if (!recvAll(conn->fd, notif.data(), notif.size(), error)) break;
          deliveredCarried(*conn, std::move(notif), false);
        }
        if (!sendMessage(*conn, Msg::Done, 1, h.seq, problem.data(), problem.size(), error)) break;
        continue;
      }
      bool ok = true;
      for (const auto& p : pieces) {
        if (!recvAll(conn->fd, region->host + p.offset, p.length, error)) {
          ok = false;
          break;
        }
      }
      if (!ok) break;
      std::vector<unsigned char> notif(notifLen);
      if (notifLen && !recvAll(conn->fd, notif.data(), notif.size(), error)) break;
      // The data is in place before the notification is delivered, and before the initiator hears Done.
      if (notifLen) deliveredCarried(*conn, std::move(notif), true);
      if (!sendMessage(*conn, Msg::Done, 0, h.seq, nullptr, 0, error)) break;
    } else {
      if (!problem.empty() || dataBytes != 0) {
        if (problem.empty()) problem = "READ request carries unexpected payload";
        if (!discard(conn->fd, dataBytes, error)) break;
        if (!sendMessage(*conn, Msg::ReadData, 1, h.seq, problem.data(), problem.size(), error)) break;
        continue;
      }
      Header rh{static_cast<uint32_t>(Msg::ReadData), 0, h.seq, total};
      std::vector<iovec> iov;
      iov.reserve(pieces.size() + 1);
      iov.push_back({&rh, sizeof(rh)});
      for (const auto& p : pieces) iov.push_back({region->host + p.offset, p.length});
      std::lock_guard<std::mutex> lock(conn->sendMutex);
      if (!sendVector(conn->fd, iov, error)) break;
    }
  }
  conn->shutdown();
  closeInboundNccl(nccl);
}

void Agent::readOutbound(std::shared_ptr<Peer> peer) {
  pthread_setname_np(pthread_self(), "tandem-peer");
  std::string error;
  // Connect: same host over the abstract unix socket, else over tcp.
  int fd = -1;
  int timeout = static_cast<int>(std::min<uint32_t>(options_.timeoutMs, 10000));
  if (peer->sameHost && !peer->d.unixSocket.empty()) {
    socklen_t len;
    sockaddr_un a = abstractAddress(peer->d.unixSocket, len);
    fd = connectWithTimeout(reinterpret_cast<sockaddr*>(&a), len, AF_UNIX, timeout, error);
  } else {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    addrinfo* res = nullptr;
    std::string port = std::to_string(peer->d.tcpPort);
    int gai = getaddrinfo(peer->d.tcpHost.c_str(), port.c_str(), &hints, &res);
    if (gai != 0 || !res) {
      error = std::string("cannot resolve ") + peer->d.tcpHost + ": " + gai_strerror(gai);
    } else {
      fd = connectWithTimeout(res->ai_addr, res->ai_addrlen, res->ai_family, timeout, error);
      freeaddrinfo(res);
    }
  }
  if (fd < 0) {
    markDead(peer, "cannot connect to peer '" + peer->d.name + "': " + error);
    return;
  }
  auto conn = std::make_shared<Connection>(fd);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    connections_.push_back(conn);
    if (closing_) {
      conn->shutdown();
      return;
    }
  }
  auto hello = helloPayload(incarnation_, options_.name);
  Header h{};
  std::vector<unsigned char> payload;
  uint64_t incarnation = 0;
  std::string name;
  bool ok = sendMessage(*conn, Msg::Hello, 0, 0, hello.data(), hello.size(), error) &&
            recvAll(fd, &h, sizeof(h), error) && h.type == static_cast<uint32_t>(Msg::HelloAck) && h.length <= 4096;
  if (ok) {
    payload.resize(h.length);
    ok = recvAll(fd, payload.data(), payload.size(), error) && parseHello(payload, incarnation, name);
  }
  if (!ok) {
    markDead(peer, "handshake with peer '" + peer->d.name + "' failed: " + (error.empty() ? "protocol error" : error));
    return;
  }
  if (incarnation != peer->d.incarnation) {
    markDead(peer, "peer '" + peer->d.name + "' restarted (its metadata is stale); load its new metadata");
    return;
  }
  // The peer polls its notifications and gave us a ring for them. Without it (it could not be mapped),
  // the socket carries them all, still numbered.
  std::unique_ptr<NotifyRing> ring;
  if (h.aux != 0 && peer->sameHost) {
    std::string ringError;
    ring = NotifyRing::open(peer->d.pid, static_cast<int>(h.aux - 1), ringError);
  }
  {
    std::lock_guard<std::mutex> lock(peer->mutex);
    if (peer->dead) {
      conn->shutdown();
      return;
    }
    peer->ring = std::move(ring);
    peer->numbered = h.aux != 0;
    peer->conn = conn;
    peer->connecting = false;
    peer->connected.notify_all();
  }

  while (!closing_) {
    spinUntilReadable(fd, spin_);
    if (!recvAll(fd, &h, sizeof(h), error)) break;
    Msg type = static_cast<Msg>(h.type);
    if (type != Msg::Done && type != Msg::ReadData) break;
    if (type == Msg::Done) {
      // nccl posts complete when both halves have: this answer is the target's half.
      std::shared_ptr<Plan> ncclPlan;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = pending_.find(h.seq);
        if (it != pending_.end() && it->second.plan->backend == Backend::Nccl) ncclPlan = it->second.plan;
      }
      if (ncclPlan) {
        if (h.aux == 0) {
          if (!discard(fd, h.length, error)) break;
          answerNccl(h.seq);
          continue;
        }
        std::string text(std::min<uint64_t>(h.length, 4096), '\0');
        if (!recvAll(fd, text.data(), text.size(), error) || !discard(fd, h.length - text.size(), error)) break;
        bool erased = false;
        {
          std::lock_guard<std::mutex> lock(mutex_);
          erased = pending_.erase(h.seq) > 0;
        }
        // Our half waits for a partner that will never come: the link is unusable from here on.
        abortNcclLink(*peer, ncclPlan, "peer '" + peer->d.name + "' refused a transfer: " + text);
        if (erased) callbacks_.completed(h.seq, false, "TANDEM_REMOTE_ERROR", "peer '" + peer->d.name + "' refused: " + text);
        continue;
      }
    }
    // Find the transfer this answers; it may have been canceled or timed out meanwhile.
    std::shared_ptr<Plan> plan;
    std::pair<size_t, size_t> group{0, 0};
    std::vector<unsigned char> notif;
    bool last = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = pending_.find(h.seq);
      if (it != pending_.end() && it->second.answered < it->second.groups.size()) {
        plan = it->second.plan;
        group = it->second.groups[it->second.answered++];
        last = it->second.answered == it->second.groups.size();
        if (last) notif = it->second.notif;
      }
    }
    if (h.aux != 0) {  // an error answer carries text
      std::string text(std::min<uint64_t>(h.length, 4096), '\0');
      if (!recvAll(fd, text.data(), text.size(), error) || !discard(fd, h.length - text.size(), error)) break;
      bool erased = false;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        erased = pending_.erase(h.seq) > 0;
      }
      if (erased || plan) callbacks_.completed(h.seq, false, "TANDEM_REMOTE_ERROR", "peer '" + peer->d.name + "' refused: " + text);
      continue;
    }
    if (type == Msg::ReadData) {
      uint64_t expected = 0;
      if (plan) {
        for (size_t i = group.first; i < group.second; ++i) expected += plan->pieces[i].length;
      }
      if (!plan || expected != h.length) {
        if (!discard(fd, h.length, error)) break;
        if (plan) {
          {
            std::lock_guard<std::mutex> lock(mutex_);
            pending_.erase(h.seq);
          }
          callbacks_.completed(h.seq, false, "TANDEM_REMOTE_ERROR", "READ answer size does not match the request");
        }
        continue;
      }
      bool recvOk = true;
      for (size_t i = group.first; i < group.second && recvOk; ++i) {
        recvOk = recvAll(fd, reinterpret_cast<void*>(plan->pieces[i].local), plan->pieces[i].length, error);
      }
      if (!recvOk) break;
    } else if (h.length) {
      if (!discard(fd, h.length, error)) break;
    }
    if (!plan || !last) continue;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (pending_.erase(h.seq) == 0) continue;  // canceled or timed out while we read
    }
    if (type == Msg::ReadData && !notif.empty()) {
      std::string notifyError;
      if (!notifyOn(*peer, *conn, notif, notifyError)) {
        callbacks_.completed(h.seq, false, "TANDEM_REMOTE_DISCONNECTED", "peer '" + peer->d.name + "': " + notifyError);
        break;
      }
    }
    callbacks_.completed(h.seq, true, "", "");
  }
  markDead(peer, closing_ ? "the transfer agent was disposed"
                          : "peer '" + peer->d.name + "' closed the connection" + (error.empty() ? "" : " (" + error + ")"));
}

// ---------------------------------------------------------------------------------------------------
// Prepare

std::shared_ptr<Plan> Agent::prepare(Op op, const std::string& peerName, const std::vector<uint32_t>& localRegions,
                                     const std::vector<uint32_t>& remoteRegions, const double* localOffsets,
                                     const double* remoteOffsets, const double* lengths, double uniformLength,
                                     const uint32_t* localIdx, const uint32_t* remoteIdx, size_t count,
                                     const std::string& backendName) {
  auto peer = this->peer(peerName);
  if (!peer) throw AgentError{"TANDEM_UNKNOWN_PEER", "no peer named '" + peerName + "' (load its metadata first)"};
  {
    std::lock_guard<std::mutex> lock(peer->mutex);
    if (peer->dead) throw AgentError{"TANDEM_REMOTE_DISCONNECTED", peer->deadReason};
  }
  if (count == 0) throw AgentError{"TANDEM_BAD_DESCRIPTOR", "a transfer needs at least one piece"};
  if (localRegions.empty() || remoteRegions.empty()) throw AgentError{"TANDEM_BAD_DESCRIPTOR", "a transfer needs a local and a remote region"};

  std::vector<std::shared_ptr<Region>> locals;
  for (uint32_t id : localRegions) {
    auto r = region(id);
    if (!r) throw AgentError{"TANDEM_NOT_REGISTERED", "local region " + std::to_string(id) + " is not registered"};
    locals.push_back(r);
  }
  std::vector<uint32_t> remotes;
  {
    std::lock_guard<std::mutex> lock(peer->mutex);
    for (uint32_t id : remoteRegions) {
      auto it = peer->regionIndex.find(id);
      if (it == peer->regionIndex.end()) {
        throw AgentError{"TANDEM_NOT_REGISTERED", "peer '" + peerName + "' has no region " + std::to_string(id) +
                                                      " in the metadata loaded (reload its metadata after it registers)"};
      }
      remotes.push_back(static_cast<uint32_t>(it->second));
    }
  }
  bool localDevice = locals[0]->kind == MemKind::Device;
  bool remoteDevice = peer->regions[remotes[0]].d.kind == MemKind::Device;
  for (auto& r : locals) {
    if ((r->kind == MemKind::Device) != localDevice) throw AgentError{"TANDEM_BAD_DESCRIPTOR", "local regions mix device and host memory"};
  }
  for (uint32_t i : remotes) {
    if ((peer->regions[i].d.kind == MemKind::Device) != remoteDevice) {
      throw AgentError{"TANDEM_BAD_DESCRIPTOR", "remote regions mix device and host memory"};
    }
  }

  // Backend: the caller's choice, or the best one for this pair.
  Backend backend;
  if (!backendName.empty()) {
    if (!parseBackend(backendName, backend)) throw AgentError{"TANDEM_BAD_ARGUMENT", "unknown backend '" + backendName + "'"};
  } else if (localDevice || remoteDevice) {
    backend = peer->sameHost ? Backend::CudaIpc : Backend::Nccl;
  } else {
    backend = peer->sameHost ? Backend::Shm : (ucx_ && (peer->d.backends & kBackendUcx) ? Backend::Ucx : Backend::Tcp);
  }
  auto unavailable = [&](const std::string& why) {
    throw AgentError{"TANDEM_BACKEND_UNAVAILABLE", std::string("backend ") + transfer::backendName(backend) + " unavailable: " + why};
  };
  switch (backend) {
    case Backend::Shm:
      if (!peer->sameHost) unavailable("peer '" + peerName + "' is on another host");
      if (localDevice || remoteDevice) unavailable("shm moves host memory only; use cuda-ipc for device memory");
      break;
    case Backend::Tcp:
      if (localDevice || remoteDevice) unavailable("tcp moves host memory only");
      break;
    case Backend::CudaIpc:
      if (!cuda_ || !cuda_->available) unavailable(std::string("CUDA unavailable: ") + (cuda_ ? cuda_->reason : "not probed"));
      if (!peer->sameHost) unavailable("peer '" + peerName + "' is on another host (CUDA IPC needs one host)");
      if (!(peer->d.backends & kBackendCudaIpc)) unavailable("peer '" + peerName + "' has no CUDA");
      if (!localDevice && !remoteDevice) unavailable("neither side is device memory; use shm");
      for (uint32_t i : remotes) {
        const auto& d = peer->regions[i].d;
        if (d.kind == MemKind::Device && !d.hasIpcHandle) unavailable("remote region " + std::to_string(d.id) + " has no CUDA IPC handle");
        if (d.kind == MemKind::Host) unavailable("remote region " + std::to_string(d.id) + " is plain host memory; register shared or pinned memory");
      }
      break;
    case Backend::Nccl:
      if (!nccl_) unavailable(ncclReason_);
      if (!(peer->d.backends & kBackendNccl)) unavailable("peer '" + peerName + "' has no NCCL");
      if (!localDevice || !remoteDevice) unavailable("nccl moves device memory to device memory only");
      for (uint32_t i : remotes) {
        if (peer->regions[i].d.device != peer->regions[remotes[0]].d.device) {
          throw AgentError{"TANDEM_BAD_DESCRIPTOR", "remote device regions span several GPUs (nccl: one GPU per side)"};
        }
      }
      break;
    case Backend::Ucx:
      if (!ucx_) unavailable(ucxReason_);
      if (!(peer->d.backends & kBackendUcx) || peer->d.ucxAddress.empty()) unavailable("peer '" + peerName + "' has no UCX");
      if (localDevice || remoteDevice) unavailable("this UCX moves host memory only (no CUDA transports)");
      for (auto& r : locals) {
        if (!isHostKind(r->kind)) unavailable("local region " + std::to_string(r->id) + " is device memory");
      }
      for (uint32_t i : remotes) {
        if (peer->regions[i].d.ucxRkey.empty()) unavailable("remote region " + std::to_string(peer->regions[i].d.id) + " has no UCX key");
      }
      break;
  }
  if (backend == Backend::Shm) {
    for (uint32_t i : remotes) {
      if (peer->regions[i].d.memfd < 0 && peer->regions[i].d.kind != MemKind::Host) {
        unavailable("remote region " + std::to_string(peer->regions[i].d.id) + " cannot be mapped");
      }
    }
  }

  auto plan = std::make_shared<Plan>();
  plan->op = op;
  plan->backend = backend;
  plan->peer = peer;
  plan->localRegionIds = localRegions;
  plan->piecesBeforeCoalescing = count;
  if (remoteDevice) plan->remoteDevice = peer->regions[remotes[0]].d.device;
  plan->deviceToDevice = localDevice && remoteDevice;
  if (localDevice) {
    plan->localDevice = locals[0]->device;
    for (auto& r : locals) {
      if (r->device != plan->localDevice) throw AgentError{"TANDEM_BAD_DESCRIPTOR", "local device regions span several GPUs"};
    }
    plan->sameDevice = remoteDevice && peer->sameHost && plan->remoteDevice == plan->localDevice;
  } else if (backend == Backend::CudaIpc) {
    plan->localDevice = 0;  // host-side copies are issued from device 0's context
  }
  plan->pieces.reserve(count);
  auto asOffset = [](double v, uint64_t& out) {
    if (!(v >= 0) || v > 9007199254740991.0 || v != std::floor(v)) return false;
    out = static_cast<uint64_t>(v);
    return true;
  };
  for (size_t i = 0; i < count; ++i) {
    uint32_t li = localIdx ? localIdx[i] : 0;
    uint32_t ri = remoteIdx ? remoteIdx[i] : 0;
    if (li >= locals.size() || ri >= remotes.size()) {
      throw AgentError{"TANDEM_BAD_DESCRIPTOR", "piece " + std::to_string(i) + " names region index " +
                                                    std::to_string(li >= locals.size() ? li : ri) + ", beyond the regions given"};
    }
    uint64_t lo, ro, len;
    double lenValue = lengths ? lengths[i] : uniformLength;
    if (!asOffset(localOffsets[i], lo) || !asOffset(remoteOffsets[i], ro) || !asOffset(lenValue, len) || len == 0) {
      throw AgentError{"TANDEM_BAD_DESCRIPTOR", "piece " + std::to_string(i) + " has a negative, fractional or zero offset/length"};
    }
    const auto& l = locals[li];
    const auto& rr = peer->regions[remotes[ri]].d;
    if (lo > l->size || len > l->size - lo) {
      throw AgentError{"TANDEM_OUT_OF_BOUNDS", "piece " + std::to_string(i) + ": local offset " + std::to_string(lo) + " + length " +
                                                   std::to_string(len) + " exceeds local region " + std::to_string(l->id) + " (" +
                                                   std::to_string(l->size) + " bytes); nothing was moved"};
    }
    if (ro > rr.size || len > rr.size - ro) {
      throw AgentError{"TANDEM_OUT_OF_BOUNDS", "piece " + std::to_string(i) + ": remote offset " + std::to_string(ro) + " + length " +
                                                   std::to_string(len) + " exceeds region " + std::to_string(rr.id) + " of peer '" +
                                                   peerName + "' (" + std::to_string(rr.size) + " bytes); nothing was moved"};
    }
    uint64_t base = l->kind == MemKind::Device ? l->dev : reinterpret_cast<uint64_t>(l->host);
    Piece p{base + lo, ro, len, remotes[ri], l->id};
    // Coalesce with the previous piece when both sides continue exactly where it ended.
    if (!plan->pieces.empty()) {
      Piece& prev = plan->pieces.back();
      if (prev.remoteRegion == p.remoteRegion && prev.localRegion == p.localRegion && prev.local + prev.length == p.local &&
          prev.remoteOff + prev.length == p.remoteOff) {
        prev.length += p.length;
        plan->bytes += len;
        continue;
      }
    }
    plan->pieces.push_back(p);
    plan->bytes += len;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  plan->id = nextPlanId_++;
  return plan;
}

// ---------------------------------------------------------------------------------------------------
// Post

void Agent::fail(uint64_t token, const std::string& code, const std::string& message) {
  callbacks_.completed(token, false, code, message);
}

void Agent::succeed(uint64_t token) { callbacks_.completed(token, true, "", ""); }

void Agent::cancel(uint64_t token) {
  bool wasPending = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    wasPending = pending_.erase(token) > 0;
    if (!wasPending) canceled_[token] = true;
  }
  if (wasPending) fail(token, "TANDEM_CANCELED", "the transfer was canceled (data already sent may have landed)");
}

// Shm transfers of at most 1 MiB run on the caller's thread when nothing is queued or running on the
// progress thread: no hand-off, and the source is often still in this core's cache (one 1 MiB post: 43-45%
// of a memcpy through the progress thread, 84-89% here). At most 1 MiB: tens of microseconds of copying on
// the JS thread. From 256 KiB up they always may; below, only when the caller has nothing else in flight
// (`alone`): posts issued back to back go faster when the progress thread copies while the JS thread posts
// the next, and a small copy is shorter than the hand-off it saves only when its completion need not wait
// behind earlier ones either.
constexpr uint64_t kInlineShmMinBytes = 256 << 10;
constexpr uint64_t kInlineShmMaxBytes = 1 << 20;
// cuda-ipc plans settled on the copy engines with at most this many pieces are issued on the caller's thread
// when they can be (tryDirectCuda): each copy costs that thread a few microseconds to submit. (A plan settled
// on the kernel is one launch, whatever its pieces.)
constexpr size_t kDirectMaxPieces = 8;

bool Agent::tryInlineShm(const Plan& plan) {
  if (closing_ || !progress_->idle()) return false;
  for (uint32_t id : plan.localRegionIds) {
    if (!region(id)) return false;  // the queued path reports it
  }
  Peer& peer = *plan.peer;
  // releasePeer unmaps under this lock; the peer's regions were mapped by an earlier post that has
  // finished (the queue is idle), so reading `mapped` here sees that post's write.
  std::lock_guard<std::mutex> lock(peer.mutex);
  if (peer.dead || peer.connecting || !peer.conn) return false;
  for (const auto& p : plan.pieces) {
    const auto& rr = peer.regions[p.remoteRegion];
    if (rr.d.kind == MemKind::Host || !rr.mapped) return false;
  }
  for (const auto& p : plan.pieces) {
    unsigned char* remote = peer.regions[p.remoteRegion].mapped + p.remoteOff;
    auto* local = reinterpret_cast<unsigned char*>(p.local);
    if (plan.op == Op::Write) std::memcpy(remote, local, p.length);
    else std::memcpy(local, remote, p.length);
  }
  return true;
}

bool Agent::post(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char> notif, bool alone) {
  // A notification means a socket write, which could block: those go through the progress thread.
  if (plan->backend == Backend::Shm && notif.empty() && (alone || plan->bytes >= kInlineShmMinBytes) &&
      plan->bytes <= kInlineShmMaxBytes && tryInlineShm(*plan)) {
    if (alone) return true;
    succeed(token);  // after completions already on their way to the caller
    return false;
  }
  if (plan->backend == Backend::CudaIpc && tryDirectCuda(plan, token, notif)) return false;
  // Until the progress thread has issued this post, later ones for the peer must queue behind it.
  const bool counted = plan->backend == Backend::CudaIpc;
  if (counted) plan->peer->queuedIssues.fetch_add(1, std::memory_order_acq_rel);
  bool queued = progress_->post([this, plan, token, counted, notif = std::move(notif)]() mutable {
    struct Issued {
      Peer* peer;
      ~Issued() {
        if (peer) peer->queuedIssues.fetch_sub(1, std::memory_order_acq_rel);
      }
    } issued{counted ? plan->peer.get() : nullptr};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (canceled_.erase(token)) {
        fail(token, "TANDEM_CANCELED", "the transfer was canceled before it started; nothing was moved");
        return;
      }
    }
    if (closing_) {
      fail(token, "TANDEM_DISPOSED", "the transfer agent was disposed");
      return;
    }
    for (uint32_t id : plan->localRegionIds) {
      if (!region(id)) {
        fail(token, "TANDEM_NOT_REGISTERED", "local region " + std::to_string(id) + " was deregistered; nothing was moved");
        return;
      }
    }
    try {
      switch (plan->backend) {
        case Backend::Shm: runShm(plan, token, notif); break;
        case Backend::Tcp: runTcp(plan, token, notif); break;
        case Backend::CudaIpc: runCudaIpc(plan, token, notif); break;
        case Backend::Ucx: runUcx(plan, token, notif); break;
        case Backend::Nccl: runNccl(plan, token, notif); break;
        default: fail(token, "TANDEM_BACKEND_UNAVAILABLE", std::string("backend ") + backendName(plan->backend) + " unavailable");
      }
    } catch (const AgentError& e) {
      fail(token, e.code, e.message);
    }
  });
  if (!queued) {
    if (counted) plan->peer->queuedIssues.fetch_sub(1, std::memory_order_acq_rel);
    fail(token, "TANDEM_DISPOSED", "the transfer agent was disposed");
  }
  return false;
}

bool Agent::notify(const std::string& peerName, uint64_t token, std::vector<unsigned char> message, bool alone) {
  auto peer = this->peer(peerName);
  if (!peer) {
    fail(token, "TANDEM_UNKNOWN_PEER", "no peer named '" + peerName + "'");
    return false;
  }
  // Into the peer's ring from this thread, when that cannot block and nothing of ours is in flight that
  // this notification could overtake (a post's notification still to come, an earlier notify).
  if (alone && !closing_) {
    bool ready;
    {
      std::lock_guard<std::mutex> lock(peer->mutex);
      ready = peer->conn && !peer->dead && peer->ring;
    }
    if (ready && progress_->idle() && tryRing(*peer, message)) return true;
  }
  bool queued = progress_->post([this, peer, token, message = std::move(message)] {
    std::string error;
    if (closing_) return fail(token, "TANDEM_DISPOSED", "the transfer agent was disposed");
    if (!sendNotify(peer, message, error)) return fail(token, "TANDEM_REMOTE_DISCONNECTED", error);
    succeed(token);
  });
  if (!queued) fail(token, "TANDEM_DISPOSED", "the transfer agent was disposed");
  return false;
}

void Agent::warmup(const std::string& peerName, uint64_t token) {
  auto peer = this->peer(peerName);
  if (!peer) {
    fail(token, "TANDEM_UNKNOWN_PEER", "no peer named '" + peerName + "'");
    return;
  }
  bool queued = progress_->post([this, peer, token] {
    if (closing_) return fail(token, "TANDEM_DISPOSED", "the transfer agent was disposed");
    int device = -1;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const auto& [id, r] : regions_) {
        if (r->kind == MemKind::Device && (device < 0 || r->device < device)) device = r->device;
      }
    }
    size_t count = 0;
    {
      std::lock_guard<std::mutex> lock(peer->mutex);
      count = peer->regions.size();
    }
    bool remoteDevice = false;
    for (size_t i = 0; i < count; ++i) remoteDevice = remoteDevice || peer->regions[i].d.kind == MemKind::Device;
    if (!cuda_ || !cuda_->available || !peer->sameHost || device < 0 || !remoteDevice) {
      return callbacks_.completed(token, true, "", "0");
    }
    try {
      std::string error;
      if (!waitConnected(peer, error)) return fail(token, "TANDEM_REMOTE_DISCONNECTED", error);
      setDevice(device);
      size_t opened = 0;
      for (size_t i = 0; i < count; ++i) {
        if (peer->regions[i].d.kind != MemKind::Device) continue;
        openRemote(*peer, peer->regions[i], device);
        ++opened;
      }
      kernelsFor(device);
      if (peer->numbered) ringOnDevice(*peer);
      if (!peer->stream) {
        checkCuda(cuda_->cuStreamCreate(&peer->stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
        peer->streamDevice = device;
      }
      callbacks_.completed(token, true, "", std::to_string(opened));
    } catch (const AgentError& e) {
      fail(token, e.code, e.message);
    }
  });
  if (!queued) fail(token, "TANDEM_DISPOSED", "the transfer agent was disposed");
}

bool Agent::sendNotify(const std::shared_ptr<Peer>& peer, const std::vector<unsigned char>& message, std::string& error) {
  auto conn = waitConnected(peer, error);
  return conn && notifyOn(*peer, *conn, message, error);
}

bool Agent::notifyOn(Peer& peer, Connection& conn, const std::vector<unsigned char>& message, std::string& error) {
  bool sent;
  if (peer.numbered) {
    // Numbered in the order written, so that the peer can put what the socket carries back in order.
    if (tryRing(peer, message)) return true;
    std::lock_guard<std::mutex> lock(peer.ringMutex);
    sent = sendMessage(conn, Msg::Notify, 0, peer.nextNotifySeq++, message.data(), message.size(), error);
  } else {
    sent = sendMessage(conn, Msg::Notify, 0, 0, message.data(), message.size(), error);
  }
  if (!sent) error = "peer '" + peer.d.name + "': " + error;
  return sent;
}

void Agent::delivered(Connection& conn, uint64_t seq, std::vector<unsigned char> message) {
  if (conn.inbox) conn.inbox->push(seq, std::move(message));
  else callbacks_.notified(conn.peerName, std::move(message));
}

bool Agent::tryRing(Peer& peer, const std::vector<unsigned char>& message) {
  std::lock_guard<std::mutex> lock(peer.ringMutex);
  if (!peer.ring || !peer.ring->tryWrite(peer.nextNotifySeq, message.data(), message.size())) return false;
  ++peer.nextNotifySeq;
  return true;
}

uint64_t Agent::carriedNumber(Peer& peer, const std::vector<unsigned char>& notif) {
  if (!peer.numbered || notif.empty()) return 0;
  std::lock_guard<std::mutex> lock(peer.ringMutex);
  return peer.nextNotifySeq++;
}

void Agent::deliveredCarried(Connection& conn, std::vector<unsigned char> notif, bool ok) {
  if (!conn.inbox || !conn.inbox->ring) {
    if (ok && !notif.empty()) delivered(conn, 0, std::move(notif));
    return;
  }
  uint64_t seq = 0;
  if (notif.size() >= 8) std::memcpy(&seq, notif.data(), 8);
  if (seq == 0) return;  // malformed: nothing to deliver or to skip
  notif.erase(notif.begin(), notif.begin() + 8);
  conn.inbox->push(seq, std::move(notif), !ok);
}

std::vector<std::pair<std::string, std::vector<unsigned char>>> Agent::takeNotifications(size_t max) {
  std::vector<std::pair<std::string, std::vector<unsigned char>>> out;
  std::vector<std::vector<unsigned char>> bytes;
  std::lock_guard<std::mutex> lock(inboxMutex_);
  for (auto it = inboxes_.begin(); it != inboxes_.end() && out.size() < max;) {
    bool finished = (*it)->drain(bytes, max - out.size());
    for (auto& b : bytes) out.emplace_back((*it)->from, std::move(b));
    bytes.clear();
    it = finished ? inboxes_.erase(it) : it + 1;
  }
  return out;
}

unsigned char* Agent::mapRemote(Peer& peer, RemoteRegion& r) {
  if (r.mapped) return r.mapped;
  if (peer.d.pid == static_cast<uint32_t>(getpid())) {
    r.mapped = reinterpret_cast<unsigned char*>(r.d.address);  // same process: already addressable
    return r.mapped;
  }
  std::string path = "/proc/" + std::to_string(peer.d.pid) + "/fd/" + std::to_string(r.d.memfd);
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    throw AgentError{errno == ENOENT ? "TANDEM_REMOTE_DISCONNECTED" : "TANDEM_BACKEND_UNAVAILABLE",
                     "cannot open region " + std::to_string(r.d.id) + " of peer '" + peer.d.name + "' (" + path + "): " +
                         std::strerror(errno)};
  }
  void* p = mmap(nullptr, r.d.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) {
    throw AgentError{"TANDEM_BACKEND_UNAVAILABLE", "cannot map region " + std::to_string(r.d.id) + " of peer '" + peer.d.name +
                                                       "': " + std::strerror(errno)};
  }
  r.mapped = static_cast<unsigned char*>(p);
  r.mappedSize = r.d.size;
  return r.mapped;
}

void Agent::runShm(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) {
  Peer& peer = *plan->peer;
  std::string error;
  // The connection proves the peer is alive; without it, data "in place" in a dead peer means nothing.
  if (!waitConnected(plan->peer, error)) return fail(token, "TANDEM_REMOTE_DISCONNECTED", error);
  bool cma = false;
  for (const auto& p : plan->pieces) {
    if (peer.regions[p.remoteRegion].d.kind == MemKind::Host) cma = true;
  }
  if (!cma) {
    for (const auto& p : plan->pieces) {
      unsigned char* remote = mapRemote(peer, peer.regions[p.remoteRegion]) + p.remoteOff;
      auto* local = reinterpret_cast<unsigned char*>(p.local);
      if (plan->op == Op::Write) {
        std::memcpy(remote, local, p.length);
      } else {
        std::memcpy(local, remote, p.length);
      }
    }
  } else {
    // Plain (unshared) host memory of another process: cross-memory attach, IOV_MAX pieces per call.
    std::vector<iovec> localIov, remoteIov;
    for (const auto& p : plan->pieces) {
      const auto& rr = peer.regions[p.remoteRegion];
      uint64_t remoteAddr = (rr.d.kind == MemKind::Host ? rr.d.address : reinterpret_cast<uint64_t>(mapRemote(peer, peer.regions[p.remoteRegion])));
      localIov.push_back({reinterpret_cast<void*>(p.local), p.length});
      remoteIov.push_back({reinterpret_cast<void*>(remoteAddr + p.remoteOff), p.length});
    }
    if (peer.d.pid == static_cast<uint32_t>(getpid())) {
      for (size_t i = 0; i < localIov.size(); ++i) {
        if (plan->op == Op::Write) std::memcpy(remoteIov[i].iov_base, localIov[i].iov_base, localIov[i].iov_len);
        else std::memcpy(localIov[i].iov_base, remoteIov[i].iov_base, localIov[i].iov_len);
      }
    } else {
      for (size_t i = 0; i < localIov.size(); i += IOV_MAX) {
        size_t n = std::min<size_t>(IOV_MAX, localIov.size() - i);
        uint64_t want = 0;
        for (size_t k = i; k < i + n; ++k) want += localIov[k].iov_len;
        ssize_t done = plan->op == Op::Write
                           ? process_vm_writev(peer.d.pid, &localIov[i], n, &remoteIov[i], n, 0)
                           : process_vm_readv(peer.d.pid, &localIov[i], n, &remoteIov[i], n, 0);
        if (done < 0 || static_cast<uint64_t>(done) != want) {
          std::string why = done < 0 ? std::strerror(errno) : "short copy";
          return fail(token, errno == ESRCH ? "TANDEM_REMOTE_DISCONNECTED" : "TANDEM_BACKEND_UNAVAILABLE",
                      "shm: cannot reach plain host memory of peer '" + peer.d.name + "' (" + why +
                          "); register shared memory with allocShared() instead");
        }
      }
    }
  }
  std::atomic_thread_fence(std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(peer.mutex);
    if (peer.dead) return fail(token, "TANDEM_REMOTE_DISCONNECTED", peer.deadReason);
  }
  if (!notif.empty() && !sendNotify(plan->peer, notif, error)) return fail(token, "TANDEM_REMOTE_DISCONNECTED", error);
  succeed(token);
}

void Agent::runTcp(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) {
  std::string error;
  auto conn = waitConnected(plan->peer, error);
  if (!conn) return fail(token, "TANDEM_REMOTE_DISCONNECTED", error);
  Peer& peer = *plan->peer;
  // One message per run of pieces that target the same remote region.
  std::vector<std::pair<size_t, size_t>> groups;
  for (size_t i = 0; i < plan->pieces.size(); ++i) {
    if (groups.empty() || plan->pieces[groups.back().first].remoteRegion != plan->pieces[i].remoteRegion) {
      groups.push_back({i, i + 1});
    } else {
      groups.back().second = i + 1;
    }
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Pending p;
    p.plan = plan;
    p.peer = plan->peer;
    p.notif = plan->op == Op::Read ? notif : std::vector<unsigned char>{};
    p.deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.timeoutMs);
    p.groups = groups;
    pending_[token] = std::move(p);
  }
  for (size_t g = 0; g < groups.size(); ++g) {
    auto [first, last] = groups[g];
    bool lastGroup = g + 1 == groups.size();
    const bool carries = plan->op == Op::Write && lastGroup && !notif.empty();
    const uint64_t number = carries ? carriedNumber(peer, notif) : 0;
    uint32_t notifLen = carries ? static_cast<uint32_t>(notif.size() + (number ? 8 : 0)) : 0;
    std::vector<WirePiece> table;
    table.reserve(last - first);
    uint64_t data = 0;
    for (size_t i = first; i < last; ++i) {
      table.push_back({plan->pieces[i].remoteOff, plan->pieces[i].length});
      data += plan->pieces[i].length;
    }
    uint32_t counts[2] = {static_cast<uint32_t>(table.size()), notifLen};
    Msg type = plan->op == Op::Write ? Msg::WriteData : Msg::ReadRequest;
    uint64_t length = sizeof(counts) + table.size() * sizeof(WirePiece) + (plan->op == Op::Write ? data + notifLen : 0);
    Header h{static_cast<uint32_t>(type), peer.regions[plan->pieces[first].remoteRegion].d.id, token, length};
    std::vector<iovec> iov{{&h, sizeof(h)}, {counts, sizeof(counts)}, {table.data(), table.size() * sizeof(WirePiece)}};
    if (plan->op == Op::Write) {
      for (size_t i = first; i < last; ++i) iov.push_back({reinterpret_cast<void*>(plan->pieces[i].local), plan->pieces[i].length});
      if (number) iov.push_back({const_cast<uint64_t*>(&number), 8});
      if (notifLen) iov.push_back({notif.data(), notif.size()});
    }
    bool sent;
    {
      std::lock_guard<std::mutex> lock(conn->sendMutex);
      sent = sendVector(conn->fd, iov, error);
    }
    if (!sent) {
      bool erased;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        erased = pending_.erase(token) > 0;
      }
      if (erased) fail(token, "TANDEM_REMOTE_DISCONNECTED", "peer '" + peer.d.name + "': " + error);
      return;
    }
  }
  // Completion arrives on the peer's reader thread (Done / ReadData).
}

void Agent::runUcx(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) {
  std::string error;
  // The control connection carries notifications and tells us when the peer dies.
  if (!waitConnected(plan->peer, error)) return fail(token, "TANDEM_REMOTE_DISCONNECTED", error);
  Peer& peer = *plan->peer;
  std::vector<std::vector<uint8_t>> rkeys;
  std::map<uint32_t, uint32_t> rkeyIndex;  // peer region index -> index into rkeys
  std::vector<UcxBackend::Piece> pieces;
  pieces.reserve(plan->pieces.size());
  for (const auto& p : plan->pieces) {
    auto it = rkeyIndex.find(p.remoteRegion);
    if (it == rkeyIndex.end()) {
      it = rkeyIndex.emplace(p.remoteRegion, static_cast<uint32_t>(rkeys.size())).first;
      rkeys.push_back(peer.regions[p.remoteRegion].d.ucxRkey);
    }
    pieces.push_back({reinterpret_cast<void*>(p.local), peer.regions[p.remoteRegion].d.address + p.remoteOff, p.length, it->second});
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Pending pend;
    pend.plan = plan;
    pend.peer = plan->peer;
    pend.deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.timeoutMs);
    pending_[token] = std::move(pend);
  }
  auto peerPtr = plan->peer;
  ucx_->post(ucxPeerKey(peer), plan->op == Op::Write, std::move(pieces), rkeys,
             [this, token, peerPtr, notif](bool ok, std::string err) {
               {
                 std::lock_guard<std::mutex> lock(mutex_);
                 if (pending_.erase(token) == 0) return;  // timed out, canceled or disposed meanwhile
               }
               if (!ok) {
                 return fail(token, "TANDEM_REMOTE_DISCONNECTED", "ucx transfer to peer '" + peerPtr->d.name + "' failed: " + err);
               }
               if (notif.empty()) return succeed(token);
               // Notifications go over the control connection, from the progress thread.
               bool queued = progress_->post([this, token, peerPtr, notif] {
                 std::string e;
                 if (!sendNotify(peerPtr, notif, e)) return fail(token, "TANDEM_REMOTE_DISCONNECTED", e);
                 succeed(token);
               });
               if (!queued) fail(token, "TANDEM_DISPOSED", "the transfer agent was disposed");
             });
}

CUdeviceptr Agent::openRemote(Peer& peer, RemoteRegion& r, int device) {
  if (r.opened) return r.opened;
  if (peer.d.pid == static_cast<uint32_t>(getpid())) {
    r.opened = r.d.address;  // same process: unified addressing already reaches it
    r.openedOn = device;
    return r.opened;
  }
  CUipcMemHandle handle{};
  std::memcpy(handle.reserved, r.d.ipcHandle, sizeof(handle.reserved));
  CUdeviceptr base = 0;
  CUresult res = cuda_->cuIpcOpenMemHandle(&base, handle, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
  if (res != CUDA_SUCCESS) {
    throw AgentError{"TANDEM_CUDA_ERROR", "cannot open CUDA IPC handle of region " + std::to_string(r.d.id) + " of peer '" +
                                              peer.d.name + "': " + cuda_->describe(res)};
  }
  r.opened = base + r.d.ipcOffset;
  r.openedOn = device;
  return r.opened;
}

Agent::DeviceKernels& Agent::kernelsFor(int device) {
  auto it = kernels_.find(device);
  if (it != kernels_.end()) return it->second;
  DeviceKernels& k = kernels_[device];
  if (options_.kernels.empty()) {
    k.error = "no kernel fatbin was given to the agent";
    return k;
  }
  setDevice(device);
  CUresult r = cuda_->cuModuleLoadData(&k.module, options_.kernels.data());
  if (r == CUDA_SUCCESS) r = cuda_->cuModuleGetFunction(&k.copyChunks, k.module, "tandem_copy_chunks");
  if (r != CUDA_SUCCESS) {
    k.error = cuda_->describe(r);
    k.copyChunks = nullptr;
    return k;
  }
  CUdevice dev;
  cuda_->cuDeviceGet(&dev, device);
  cuda_->cuDeviceGetAttribute(&k.multiprocessors, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev);
  // One empty launch now: with lazy module loading the first launch pays for loading the function,
  // which would otherwise land in the first timed trial and steer the plan to the copy engines.
  CUdeviceptr none = 0;
  unsigned zero = 0;
  void* args[] = {&none, &zero};
  if (cuda_->cuLaunchKernel(k.copyChunks, 1, 1, 1, 32, 1, 1, 0, nullptr, args, nullptr) == CUDA_SUCCESS) {
    cuda_->cuCtxSynchronize();
  }
  return k;
}

void Agent::sweepChunkTables(bool all) {
  for (auto it = chunkTables_.begin(); it != chunkTables_.end();) {
    if (all || it->second.plan.expired()) {
      setDevice(it->second.device);
      cuda_->cuMemFree(it->second.table);
      it = chunkTables_.erase(it);
    } else {
      ++it;
    }
  }
}



void Agent::runCudaIpc(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) {
  std::string error;
  if (!waitConnected(plan->peer, error)) return fail(token, "TANDEM_REMOTE_DISCONNECTED", error);
  Peer& peer = *plan->peer;
  setDevice(plan->localDevice);
  if (!peer.stream || peer.streamDevice != plan->localDevice) {
    CUstream old = nullptr;
    {
      std::lock_guard<std::mutex> lock(peer.mutex);
      ++peer.cudaEpoch;
      std::swap(old, peer.stream);
    }
    if (old) {
      setDevice(peer.streamDevice);
      cuda_->cuStreamSynchronize(old);
      cuda_->cuStreamDestroy(old);
      setDevice(plan->localDevice);
    }
    CUstream stream = nullptr;
    checkCuda(cuda_->cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
    std::lock_guard<std::mutex> lock(peer.mutex);
    peer.stream = stream;
    peer.streamDevice = plan->localDevice;
  }
  // Few pieces: the copy engines (one async copy each). Many pieces: one launch of the chunk-copy
  // kernel over a table uploaded once per plan. Large pieces: batched copy-engine copies. All run on the
  // peer's stream, in post order.
  // (One piece stays on the copy engines: the kernel over 1 MiB or 256 KiB in chunks for every SM was
  // slower back to back, 8.9 against 6.0 us per 1 MiB at 32 in flight: bench/micro/depth.ts, 2 x H200.)
  constexpr size_t kKernelMinPieces = 2;
  constexpr size_t kCopyEngineMaxPieces = 1024;  // beyond this, per-copy submission cost dominates
  constexpr uint64_t kChunkBytes = 128 << 10;
  int use = plan->strategy;
  bool timed = false;
  DeviceKernels* kernels = nullptr;
  if (use == Plan::kUndecided || use == Plan::kKernel) {
    kernels = plan->pieces.size() >= kKernelMinPieces ? &kernelsFor(plan->localDevice) : nullptr;
  }
  if (use == Plan::kUndecided) {
    if (!plan->candidates) {
      // A batch costs the host 0.55 - 0.93 us per copy (H200, driver 580), so it keeps the copy engines busy
      // only where a piece takes longer than that on the link: 256 KiB and up, on average.
      // (bench/micro/ce_scatter.cu, GPU0 -> GPU1: 256 x 2 MiB in calls of 2, 8, 32 and the rest 99.5% of one
      // contiguous copy; 4096 x 64 KiB 118 GB/s, bound by the host.) Device memory on both sides only: that
      // is what was measured, and host pointers have their own rules in a batch.
      constexpr uint64_t kBatchMinAverageBytes = 256 << 10;
      unsigned c = 0;
      // The kernel only between device memory: a kernel on the plan's device faulted
      // (CUDA_ERROR_ILLEGAL_ADDRESS, which ends the context) on pinned host memory registered by an agent on
      // GPU 1 (test/gpu/02, 2026-11-23), and a peer's host memory is only mapped, never registered. The copy
      // engines move host memory.
      if (kernels && kernels->copyChunks && plan->deviceToDevice) c |= 1u << Plan::kKernel;
      if (plan->pieces.size() <= kCopyEngineMaxPieces) c |= 1u << Plan::kCopyEngine;
      const bool batchable =
          cuda_->cuMemcpyBatchAsync && copyBatchOn_ && plan->deviceToDevice && !plan->pieces.empty();
      if (batchable && plan->pieces.size() >= 2 && plan->bytes / plan->pieces.size() >= kBatchMinAverageBytes) {
        c |= 1u << Plan::kBatch;
      }
      // TANDEM_CUDA_COPY names one strategy: used wherever it can run (tests, and A/B measurements).
      if (forcedCopy_ == Plan::kBatch && batchable) c = 1u << Plan::kBatch;
      if (forcedCopy_ >= 0 && (c & (1u << forcedCopy_))) c = 1u << forcedCopy_;
      plan->candidates = c ? c : 1u << Plan::kCopyEngine;
    }
    const unsigned c = plan->candidates;
    if ((c & (c - 1)) == 0) {
      use = plan->strategy = __builtin_ctz(c);
    } else {
      // Take turns, timed, until each candidate has run kTrials times; later posts use the fastest.
      for (int k = 0; k < Plan::kStrategies; ++k) {
        if (!(c & (1u << k))) continue;
        if (use == Plan::kUndecided || plan->trialsIssued[k] < plan->trialsIssued[use]) use = k;
      }
      ++plan->trialsIssued[use];
      timed = true;
    }
  }
  setDevice(plan->localDevice);
  // Where piece p's bytes go from and to, in this process's address space.
  auto endpoints = [&](const Piece& p) {
    auto& rr = peer.regions[p.remoteRegion];
    CUdeviceptr remote = (rr.d.kind == MemKind::Device ? openRemote(peer, rr, plan->localDevice)
                                                       : reinterpret_cast<CUdeviceptr>(mapRemote(peer, rr))) +
                         p.remoteOff;
    CUdeviceptr local = p.local;
    return plan->op == Op::Write ? std::pair{local, remote} : std::pair{remote, local};  // (src, dst)
  };
  // The kernel's chunk table is built and uploaded once per plan, before any timing starts.
  std::map<uint64_t, ChunkTable>::iterator table = chunkTables_.end();
  if (use == Plan::kKernel) {
    table = chunkTables_.find(plan->id);
    if (table == chunkTables_.end()) {
      sweepChunkTables(false);
      std::vector<unsigned long long> entries;  // (src, dst, bytes) triples
      for (const auto& p : plan->pieces) {
        auto [src, dst] = endpoints(p);
        for (uint64_t off = 0; off < p.length; off += kChunkBytes) {
          entries.push_back(src + off);
          entries.push_back(dst + off);
          entries.push_back(std::min(kChunkBytes, p.length - off));
        }
      }
      ChunkTable t;
      t.plan = plan;
      t.device = plan->localDevice;
      t.count = static_cast<unsigned>(entries.size() / 3);
      setDevice(plan->localDevice);
      checkCuda(cuda_->cuMemAlloc(&t.table, entries.size() * sizeof(unsigned long long)), "cuMemAlloc (chunk table)");
      CUresult up = cuda_->cuMemcpyHtoDAsync(t.table, entries.data(), entries.size() * sizeof(unsigned long long), peer.stream);
      if (up == CUDA_SUCCESS) up = cuda_->cuStreamSynchronize(peer.stream);
      if (up != CUDA_SUCCESS) {
        cuda_->cuMemFree(t.table);
        checkCuda(up, "upload of the chunk table");
      }
      table = chunkTables_.emplace(plan->id, t).first;
    }
  }
  // Once the strategy is settled, what this post issued is kept for the caller's thread to issue again
  // (tryDirectCuda). Only this thread writes `direct` and the epoch; the caller reads them under the peer's
  // mutex.
  const bool resolveDirect = !timed && (!plan->direct || plan->direct->epoch != peer.cudaEpoch);
  auto publishDirect = [&](std::unique_ptr<Plan::Direct> direct) {
    direct->context = contexts_.at(plan->localDevice);
    direct->stream = peer.stream;
    std::lock_guard<std::mutex> lock(peer.mutex);
    direct->epoch = peer.cudaEpoch;
    plan->direct = std::move(direct);
  };
  CUevent startEvent = nullptr;
  if (timed) {
    checkCuda(cuda_->cuEventCreate(&startEvent, 0), "cuEventCreate");
    checkCuda(cuda_->cuEventRecord(startEvent, peer.stream), "cuEventRecord");
  }
  if (use == Plan::kKernel) {
    // Four blocks per SM, except within one GPU for plenty of chunks of 32 KiB and more: one
    // (bench/micro/peer_copy_mix.cu, 16384 x 64 KiB: 92.8% of a device-to-device copy against 91.0%;
    // bench:transfer: 4096 x 64 KiB 1870 -> 1943 GB/s). Smaller or fewer chunks need the four (16 KiB
    // pieces fell from 1832 to 1393 GB/s with one).
    const unsigned sms = static_cast<unsigned>(std::max(1, kernels->multiprocessors));
    const unsigned count = table->second.count;
    const int perSm = plan->sameDevice && count >= 8 * sms && plan->bytes / count >= (32u << 10) ? 1 : 4;
    unsigned blocks = std::min<unsigned>(count, sms * perSm);
    void* args[] = {&table->second.table, &table->second.count};
    checkCuda(cuda_->cuLaunchKernel(kernels->copyChunks, blocks, 1, 1, 512, 1, 1, 0, peer.stream, args, nullptr),
              "launch of tandem_copy_chunks");
    if (resolveDirect) {  // one launch, however many pieces
      auto direct = std::make_unique<Plan::Direct>();
      direct->kernel = kernels->copyChunks;
      direct->blocks = blocks;
      direct->table = table->second.table;
      direct->count = table->second.count;
      publishDirect(std::move(direct));
    }
  } else if (use == Plan::kBatch) {
    // Calls of 2, 8, 32, 128... copies: the copy engines start once the first two are submitted, and each
    // call keeps them busy while the host submits the next (0.55 - 0.93 us of host time per copy; a 2 MiB
    // piece takes 5.3 us on NVLink). Each call also costs the GPU 3-4 us (bench/micro/ce_scatter.cu: 128 x
    // 2 MiB in calls of 4, 8, 16 copies: 88.5, 93.0, 95.7% of one contiguous copy; 256 x 2 MiB in calls
    // growing by four: 99.5%), hence few, growing calls.
    if (!plan->batch || plan->batch->epoch != peer.cudaEpoch) {
      auto b = std::make_unique<Plan::Batch>();
      b->epoch = peer.cudaEpoch;
      for (const auto& p : plan->pieces) {
        auto [src, dst] = endpoints(p);
        b->srcs.push_back(src);
        b->dsts.push_back(dst);
        b->sizes.push_back(p.length);
      }
      plan->batch = std::move(b);
    }
    Plan::Batch& b = *plan->batch;
    CUmemcpyAttributes attr{};
    attr.srcAccessOrder = CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
    size_t attrIndex = 0;
    size_t step = 2;
    for (size_t i = 0; i < b.sizes.size(); i += step, step *= 4) {
      // The last call takes what would leave too few for another.
      if (b.sizes.size() - i <= step * 4) step = b.sizes.size() - i;
      size_t failed = SIZE_MAX;
      CUresult r = cuda_->cuMemcpyBatchAsync(&b.dsts[i], &b.srcs[i], &b.sizes[i], step, &attr, &attrIndex, 1, &failed,
                                             peer.stream);
      if (r != CUDA_SUCCESS) {
        // Copies already submitted still run; the caller's stream bookkeeping below is skipped (throw),
        // so wait for them before the failure is reported.
        cuda_->cuStreamSynchronize(peer.stream);
        const std::string what = "cuMemcpyBatchAsync (copy " + std::to_string(i + (failed == SIZE_MAX ? 0 : failed)) + ")";
        checkCuda(r, what.c_str());
      }
    }
  } else {
    const bool resolve = resolveDirect && plan->pieces.size() <= kDirectMaxPieces;  // few pieces only
    std::vector<Plan::Direct::Copy> copies;
    for (const auto& p : plan->pieces) {
      auto [src, dst] = endpoints(p);
      checkCuda(cuda_->cuMemcpyAsync(dst, src, p.length, peer.stream), "cuMemcpyAsync");
      if (resolve) copies.push_back({dst, src, p.length});
    }
    if (resolve) {
      auto direct = std::make_unique<Plan::Direct>();
      direct->copies = std::move(copies);
      publishDirect(std::move(direct));
    }
  }
  // Completion: an event the progress thread polls between jobs (a host callback costs tens of
  // microseconds more before anyone hears of it).
  CUevent event = nullptr;
  if (timed) {
    checkCuda(cuda_->cuEventCreate(&event, 0), "cuEventCreate");
  } else {
    event = takeEvent(plan->localDevice);
    if (!event) checkCuda(cuda_->cuEventCreate(&event, CU_EVENT_DISABLE_TIMING), "cuEventCreate");
  }
  // The notification: numbered now, and committed by the stream after the copies when it is in the ring.
  // (The ring is registered at the peer's first post, with a notification or not, so that posts issued
  // by the caller's thread find it.)
  const CUdeviceptr ringDevice = peer.numbered ? ringOnDevice(peer) : 0;
  CudaNotice notice = reserveNotice(peer, std::move(notif));
  if (ringDevice && !streamCommit(peer, notice, peer.stream, ringDevice)) {
    std::lock_guard<std::mutex> lock(peer.mutex);
    peer.ringOnDevice = 0;  // the host commits this peer's notifications from now on
  }
  CUresult rec = cuda_->cuEventRecord(event, peer.stream);
  if (rec != CUDA_SUCCESS) {
    cuda_->cuEventDestroy(event);
    std::string ignored;
    settleNotice(plan->peer, notice, false, ignored);
    checkCuda(rec, "cuEventRecord");
  }
  inflight_.push_back(Inflight{event, plan->localDevice, startEvent, cudaDone(plan, token, use, std::move(notice))});
}

void Agent::giveEvent(int device, CUevent event) {
  if (!event) return;
  std::lock_guard<std::mutex> lock(eventMutex_);
  eventPool_.push_back({device, event});
}

CUevent Agent::takeEvent(int device) {
  std::lock_guard<std::mutex> lock(eventMutex_);
  for (auto it = eventPool_.begin(); it != eventPool_.end(); ++it) {
    if (it->first == device) {
      CUevent event = it->second;
      eventPool_.erase(it);
      return event;
    }
  }
  return nullptr;
}

std::function<void(CUresult, float)> Agent::cudaDone(const std::shared_ptr<Plan>& plan, uint64_t token, int use,
                                                     CudaNotice notice) {
  return [this, token, plan, use, notice = std::move(notice)](CUresult result, float ms) mutable {
    if (ms >= 0 && plan->strategy == Plan::kUndecided) {
      if (plan->trialMs[use] < 0 || ms < plan->trialMs[use]) plan->trialMs[use] = ms;
      ++plan->trialsDone[use];
      bool done = true;
      int best = -1;
      for (int k = 0; k < Plan::kStrategies; ++k) {
        if (!(plan->candidates & (1u << k))) continue;
        if (plan->trialsDone[k] < Plan::kTrials) done = false;
        if (best < 0 || plan->trialMs[k] < plan->trialMs[best]) best = k;
      }
      if (done) plan->strategy = best;
    }
    const auto& peer = plan->peer;
    std::string err;
    if (result != CUDA_SUCCESS) {
      settleNotice(peer, notice, false, err);
      return fail(token, "TANDEM_CUDA_ERROR", "cuda-ipc copy failed: " + cuda_->describe(result));
    }
    {
      std::unique_lock<std::mutex> lock(peer->mutex);
      if (peer->dead) {
        std::string reason = peer->deadReason;
        lock.unlock();
        settleNotice(peer, notice, false, err);
        return fail(token, "TANDEM_REMOTE_DISCONNECTED", reason);
      }
    }
    if (!settleNotice(peer, notice, true, err)) return fail(token, "TANDEM_REMOTE_DISCONNECTED", err);
    succeed(token);
  };
}

Agent::CudaNotice Agent::reserveNotice(Peer& peer, std::vector<unsigned char> notif) {
  CudaNotice notice;
  notice.bytes = std::move(notif);
  if (notice.bytes.empty() || !peer.numbered) return notice;
  std::lock_guard<std::mutex> lock(peer.ringMutex);
  notice.seq = peer.nextNotifySeq++;
  if (peer.ring && !peer.ring->tryWrite(notice.seq, notice.bytes.data(), notice.bytes.size(), &notice.commitWord)) {
    notice.commitWord = nullptr;  // the ring is full (or the message too big): the socket, when the copy is done
  }
  return notice;
}

bool Agent::streamCommit(Peer& peer, CudaNotice& notice, CUstream stream, CUdeviceptr ringDevice) {
  if (!notice.commitWord) return true;
  const auto at = reinterpret_cast<unsigned char*>(notice.commitWord) - static_cast<unsigned char*>(peer.ring->mapping());
  // The default flags put a fence before the write: the copies' stores are visible before the commit.
  CUresult r = cuda_->cuStreamWriteValue32(stream, ringDevice + static_cast<CUdeviceptr>(at), NotifyRing::kCommitted,
                                           CU_STREAM_WRITE_VALUE_DEFAULT);
  if (r != CUDA_SUCCESS) return false;  // still pending: the host commits it when the copy is done
  notice.streamCommits = true;
  streamCommits_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

CUdeviceptr Agent::ringOnDevice(Peer& peer) {
  if (!peer.ringRegisterTried && peer.ring && streamCommitOn_) {
    peer.ringRegisterTried = true;  // once: a failure leaves the host committing the notifications
    void* mapping = peer.ring->mapping();
    if (cuda_->cuMemHostRegister(mapping, peer.ring->mappedBytes(),
                                 CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP) == CUDA_SUCCESS) {
      CUdeviceptr address = 0;
      CUresult r = cuda_->cuMemHostGetDevicePointer(&address, mapping, 0);
      std::lock_guard<std::mutex> lock(peer.mutex);
      peer.ringRegisteredOn = currentDevice_;  // unregistered in releasePeer
      peer.ringOnDevice = r == CUDA_SUCCESS ? address : 0;
    }
  }
  // The address is the mapping's in the context it was registered in (the same everywhere with unified
  // addressing, but only that one is relied on).
  std::lock_guard<std::mutex> lock(peer.mutex);
  return peer.ringRegisteredOn == currentDevice_ ? peer.ringOnDevice : 0;
}

bool Agent::settleNotice(const std::shared_ptr<Peer>& peer, CudaNotice& notice, bool ok, std::string& error) {
  if (notice.bytes.empty()) return true;
  if (notice.seq == 0) return !ok || sendNotify(peer, notice.bytes, error);  // the peer does not number them
  if (notice.commitWord) {
    if (notice.streamCommits) {
      if (ok) return true;  // the stream committed it
      // The stream may still write that commit word, so it cannot be reused: the ring's order is lost.
      // Ending the connection lets the target give up the record (and see later notifications on a new one).
      markDead(peer, "a cuda-ipc copy to peer '" + peer->d.name + "' failed after its notification was queued; " +
                         "load its metadata again to reconnect");
      error = peer->deadReason;
      return false;
    }
    std::lock_guard<std::mutex> lock(peer->ringMutex);
    NotifyRing::commit(notice.commitWord, notice.seq, ok);
    return true;
  }
  // Over the socket, under the number it was given: the notification, or that number given up.
  auto conn = waitConnected(peer, error);
  bool sent = conn && sendMessage(*conn, Msg::Notify, ok ? 0 : kNotifySkip, notice.seq, notice.bytes.data(),
                                  ok ? notice.bytes.size() : 0, error);
  if (!sent && conn) error = "peer '" + peer->d.name + "': " + error;
  return sent;
}

bool Agent::tryDirectCuda(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) {
  Peer& peer = *plan->peer;
  // Only when the progress thread is idle: in a burst of posts it issues them faster than this thread would
  // (each direct post also hands it the completion), while this thread goes on posting. A plan has
  // `direct` only once its strategy is settled on the copy engines (see runCudaIpc).
  if (!directPostsOn_ || closing_ || peer.queuedIssues.load(std::memory_order_acquire) != 0 || !progress_->idle()) {
    return false;
  }
  for (uint32_t id : plan->localRegionIds) {
    if (!region(id)) return false;  // the queued path reports it
  }
  std::unique_lock<std::mutex> lock(peer.mutex);  // releasePeer cannot take the stream meanwhile
  const Plan::Direct* direct = plan->direct.get();
  if (peer.dead || !direct || direct->epoch != peer.cudaEpoch) return false;
  CUevent event = takeEvent(plan->localDevice);
  CUresult r = cuda_->cuCtxPushCurrent(direct->context);
  if (r != CUDA_SUCCESS) {
    lock.unlock();
    giveEvent(plan->localDevice, event);
    return false;
  }
  if (!event) r = cuda_->cuEventCreate(&event, CU_EVENT_DISABLE_TIMING);
  if (direct->kernel) {
    CUdeviceptr table = direct->table;
    unsigned count = direct->count;
    void* args[] = {&table, &count};
    if (r == CUDA_SUCCESS) {
      r = cuda_->cuLaunchKernel(direct->kernel, direct->blocks, 1, 1, 512, 1, 1, 0, direct->stream, args, nullptr);
    }
  }
  for (const auto& c : direct->copies) {
    if (r == CUDA_SUCCESS) r = cuda_->cuMemcpyAsync(c.dst, c.src, c.bytes, direct->stream);
  }
  CudaNotice notice;
  if (r == CUDA_SUCCESS) {
    // The ring's address is known once a post of this peer has gone through the progress thread.
    const CUdeviceptr ringDevice = peer.ringRegisteredOn == plan->localDevice ? peer.ringOnDevice : 0;
    notice = reserveNotice(peer, std::move(notif));
    if (ringDevice && !streamCommit(peer, notice, direct->stream, ringDevice)) peer.ringOnDevice = 0;
    r = cuda_->cuEventRecord(event, direct->stream);
  }
  CUcontext popped = nullptr;
  cuda_->cuCtxPopCurrent(&popped);
  lock.unlock();
  if (r != CUDA_SUCCESS) {
    giveEvent(plan->localDevice, event);
    std::string ignored;
    settleNotice(plan->peer, notice, false, ignored);
    fail(token, "TANDEM_CUDA_ERROR", "cuda-ipc copy failed: " + cuda_->describe(r));
    return true;
  }
  directPosts_.fetch_add(1, std::memory_order_relaxed);
  // The progress thread watches the event from here on (waking it overlaps the copy).
  const int use = direct->kernel ? Plan::kKernel : Plan::kCopyEngine;
  Inflight inflight{event, plan->localDevice, nullptr, cudaDone(plan, token, use, std::move(notice))};
  if (!progress_->post([this, inflight = std::move(inflight)]() mutable { inflight_.push_back(std::move(inflight)); })) {
    fail(token, "TANDEM_DISPOSED", "the transfer agent was disposed (the copy was issued)");
  }
  return true;
}

}  // namespace tandem::transfer
