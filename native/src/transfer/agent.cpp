#include "agent.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/stat.h>
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

#include "auth.h"
#include "backends/cuda_ipc.h"
#include "backends/nccl.h"
#include "backends/shm.h"
#include "backends/tcp.h"
#include "backends/ucx.h"
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

const char* opName(Op op) { return op == Op::Write ? "WRITE" : "READ"; }

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

// The uid of the process at the other end of a loopback tcp connection, from /proc/net/tcp{,6} (the
// connecting socket's line: its local address is our peer's, its remote one ours). False: not loopback,
// or not found (`loopback` says which). (Unix sockets have SO_PEERCRED; tcp has no such thing, but a
// loopback peer is a local process all the same.)
bool loopbackPeerUid(int fd, uint32_t& uid, bool& loopback) {
  loopback = false;
  sockaddr_storage ours{}, theirs{};
  socklen_t oursLen = sizeof(ours), theirsLen = sizeof(theirs);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&ours), &oursLen) != 0 ||
      getpeername(fd, reinterpret_cast<sockaddr*>(&theirs), &theirsLen) != 0 || ours.ss_family != theirs.ss_family) {
    return false;
  }
  auto hex4 = [](const in_addr& a, uint16_t port) {
    char out[16];
    std::snprintf(out, sizeof(out), "%08X:%04X", static_cast<unsigned>(a.s_addr), static_cast<unsigned>(ntohs(port)));
    return std::string(out);
  };
  auto hex6 = [](const in6_addr& a, uint16_t port) {
    std::string out;
    char word[12];
    for (int i = 0; i < 4; ++i) {
      uint32_t w;
      std::memcpy(&w, a.s6_addr + 4 * i, 4);
      std::snprintf(word, sizeof(word), "%08X", static_cast<unsigned>(w));
      out += word;
    }
    std::snprintf(word, sizeof(word), ":%04X", static_cast<unsigned>(ntohs(port)));
    return out + word;
  };
  std::string local, remote, table;
  if (theirs.ss_family == AF_INET) {
    const auto& t = reinterpret_cast<const sockaddr_in&>(theirs);
    const auto& o = reinterpret_cast<const sockaddr_in&>(ours);
    if ((ntohl(t.sin_addr.s_addr) >> 24) != 127) return false;
    loopback = true;
    local = hex4(t.sin_addr, t.sin_port);
    remote = hex4(o.sin_addr, o.sin_port);
    table = "/proc/net/tcp";
  } else if (theirs.ss_family == AF_INET6) {
    const auto& t = reinterpret_cast<const sockaddr_in6&>(theirs);
    const auto& o = reinterpret_cast<const sockaddr_in6&>(ours);
    if (IN6_IS_ADDR_V4MAPPED(&t.sin6_addr)) {  // an IPv4 client of a dual-stack listener: in the IPv4 table
      in_addr t4{}, o4{};
      std::memcpy(&t4, t.sin6_addr.s6_addr + 12, 4);
      std::memcpy(&o4, o.sin6_addr.s6_addr + 12, 4);
      if ((ntohl(t4.s_addr) >> 24) != 127) return false;
      loopback = true;
      local = hex4(t4, t.sin6_port);
      remote = hex4(o4, o.sin6_port);
      table = "/proc/net/tcp";
    } else {
      if (!IN6_IS_ADDR_LOOPBACK(&t.sin6_addr)) return false;
      loopback = true;
      local = hex6(t.sin6_addr, t.sin6_port);
      remote = hex6(o.sin6_addr, o.sin6_port);
      table = "/proc/net/tcp6";
    }
  } else {
    return false;
  }
  std::ifstream in(table);
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string slot, l, r, state, queues, timer, retransmits, owner;
    if (!(fields >> slot >> l >> r >> state >> queues >> timer >> retransmits >> owner)) continue;
    if (l == local && r == remote) {
      uid = static_cast<uint32_t>(std::strtoul(owner.c_str(), nullptr, 10));
      return true;
    }
  }
  return false;
}

// Whether a region of a reloaded peer is the one already known (same registration, same memory).
bool sameRegion(const RegionDescriptor& a, const RegionDescriptor& b) {
  return a.id == b.id && a.kind == b.kind && a.device == b.device && a.size == b.size && a.address == b.address &&
         a.memfd == b.memfd && a.inode == b.inode && a.fileDevice == b.fileDevice && a.hasIpcHandle == b.hasIpcHandle &&
         a.ipcOffset == b.ipcOffset && std::memcmp(a.ipcHandle, b.ipcHandle, sizeof(a.ipcHandle)) == 0 &&
         a.ucxRkey == b.ucxRkey;
}

}  // namespace

HostMapping::~HostMapping() {
  // cuMemHostUnregister is done by the agent (progress thread) before the last reference drops.
  if (base && base != MAP_FAILED) munmap(base, size);
  if (memfd >= 0) ::close(memfd);
}

// ---------------------------------------------------------------------------------------------------
// Connections

namespace {

// Hello and HelloAck: u64 incarnation, u16 name length, name, then (authenticating) the sender's nonce and,
// in the HelloAck, the target's proof (auth.h).
std::vector<unsigned char> helloPayload(uint64_t incarnation, const std::string& name, const auth::Nonce* nonce = nullptr,
                                        const auth::Proof* proof = nullptr) {
  std::vector<unsigned char> out(sizeof(uint64_t) + sizeof(uint16_t) + name.size());
  std::memcpy(out.data(), &incarnation, 8);
  uint16_t len = static_cast<uint16_t>(name.size());
  std::memcpy(out.data() + 8, &len, 2);
  std::memcpy(out.data() + 10, name.data(), name.size());
  if (nonce) out.insert(out.end(), nonce->begin(), nonce->end());
  if (proof) out.insert(out.end(), proof->begin(), proof->end());
  return out;
}

struct Hello {
  uint64_t incarnation = 0;
  std::string name;
  bool hasNonce = false, hasProof = false;
  auth::Nonce nonce{};
  auth::Proof proof{};
};

bool parseHello(const std::vector<unsigned char>& p, Hello& out) {
  if (p.size() < 10) return false;
  std::memcpy(&out.incarnation, p.data(), 8);
  uint16_t len;
  std::memcpy(&len, p.data() + 8, 2);
  const size_t base = 10u + len;
  if (p.size() != base && p.size() != base + 32 && p.size() != base + 64) return false;
  out.name.assign(reinterpret_cast<const char*>(p.data() + 10), len);
  out.hasNonce = p.size() >= base + 32;
  out.hasProof = p.size() == base + 64;
  if (out.hasNonce) std::memcpy(out.nonce.data(), p.data() + base, 32);
  if (out.hasProof) std::memcpy(out.proof.data(), p.data() + base + 32, 32);
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
    : options_(std::move(options)), callbacks_(std::move(callbacks)), cuda_(cuda, options_.kernels) {
  incarnation_ = randomIncarnation();
  hostKey_ = makeHostKey();
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(incarnation_));
  unixName_ = std::string("tandem.") + hex;
  startListening();
  backends_[static_cast<size_t>(Backend::Shm)] = std::make_unique<ShmBackend>(*this);
  backends_[static_cast<size_t>(Backend::Tcp)] = std::make_unique<TcpBackend>(*this);
  backends_[static_cast<size_t>(Backend::CudaIpc)] = std::make_unique<CudaIpcBackend>(*this);
  backends_[static_cast<size_t>(Backend::Nccl)] = std::make_unique<NcclBackend>(*this);
  backends_[static_cast<size_t>(Backend::Ucx)] = std::make_unique<UcxBackend>(*this);
  progress_ = std::make_unique<WorkQueue>("tandem-xfer");
  progress_->setPoll([this] { return cuda_.poll(); });
  // Posts often come in runs (a request's blocks, a bench loop): spinning briefly between them saves
  // the thread's wake-up on each. TANDEM_PROGRESS_SPIN_US overrides (0: never spin).
  {
    long spinUs = 50;
    if (const char* env = std::getenv("TANDEM_PROGRESS_SPIN_US")) spinUs = std::max(0L, std::strtol(env, nullptr, 10));
    spin_ = std::chrono::microseconds(spinUs);
    progress_->setSpin(spin_);
  }
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
  for (auto& p : peers) {
    for (auto& b : backends_) b->closePeer(*p, true);
  }
  // Jobs still queued see closing_ and reject; then release CUDA state on the progress thread.
  progress_->post([this] { releaseCuda(); });
  progress_->stop();
  for (auto& b : backends_) b->shutdown();  // ucx: fails whatever UCX still had in flight, joins its thread
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


uint32_t Agent::backends() const {
  uint32_t bits = 0;
  for (const auto& b : backends_) {
    if (b->unavailableReason().empty()) bits |= b->bit();
  }
  return bits;
}

void Agent::unavailable(Backend b, const std::string& why) {
  throw AgentError{"TANDEM_BACKEND_UNAVAILABLE", std::string("backend ") + backendName(b) + " unavailable: " + why};
}

// ---------------------------------------------------------------------------------------------------
// Dead peers' memory (progress thread)

void Agent::releasePeer(Peer& peer) {
  // The backends first: cuda-ipc waits for the copies it issued through these mappings.
  for (auto& b : backends_) b->releasePeer(peer);
  const bool otherProcess = peer.d.pid != static_cast<uint32_t>(getpid());
  std::lock_guard<std::mutex> lock(peer.mutex);  // against the shm copies on the caller's thread
  for (auto& r : peer.regions) {
    if (r->mapped && r->mappedSize && otherProcess) munmap(r->mapped, r->mappedSize);
    r->mapped = nullptr;
    r->mappedSize = 0;
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
  cuda_.drain();
  releaseRetired();
  if (!cuda_.available() || !cuda_.hasContexts()) {
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
  const CudaDriver* cuda = cuda_.driver();
  for (auto& r : regions) {
    if (r->ownsDevice && r->dev) {
      cuda_.setDevice(r->device);
      cuda->cuMemFree(r->dev);
      r->dev = 0;
    }
    if (r->mapping && r->mapping->cudaRegistered) {
      cuda->cuMemHostUnregister(r->mapping->base);
      r->mapping->cudaRegistered = false;
    }
  }
  for (auto& b : backends_) b->releaseOnProgress();
  cuda_.releaseModulesAndContexts();
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
  ++generation_;
  r->desc.id = r->id;
  r->desc.kind = r->kind;
  r->desc.size = size;
  r->desc.address = reinterpret_cast<uint64_t>(data);
  for (auto& b : backends_) b->regionRegistered(*r);
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
      cuda_.setDevice(0);
      cuda_.check(cuda_.driver()->cuMemHostRegister(mapping->base, size, CU_MEMHOSTREGISTER_PORTABLE), "cuMemHostRegister");
      mapping->cudaRegistered = true;
      return 0;
    });
  }
  std::lock_guard<std::mutex> lock(mutex_);
  r->id = nextRegionId_++;
  ++generation_;
  r->desc.id = r->id;
  r->desc.kind = r->kind;
  r->desc.size = size;
  r->desc.address = reinterpret_cast<uint64_t>(r->host);
  r->desc.memfd = mapping->memfd;
  struct stat st {};
  if (fstat(mapping->memfd, &st) == 0) {
    r->desc.inode = st.st_ino;
    r->desc.fileDevice = st.st_dev;
  }
  for (auto& b : backends_) b->regionRegistered(*r);
  regions_[r->id] = r;
  return r;
}

std::shared_ptr<Region> Agent::registerDevice(int device, CUdeviceptr ptr, uint64_t size, bool owns) {
  if (!cuda_.available()) {
    throw AgentError{"TANDEM_CUDA_UNAVAILABLE", "CUDA unavailable: " + cuda_.reason()};
  }
  if (device < 0 || device >= cuda_.driver()->deviceCount) {
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
    cuda_.setDevice(device);
    // The range must lie inside one allocation of this device; the IPC handle names that allocation.
    CUdeviceptr base = 0;
    size_t allocSize = 0;
    CUresult res = cuda_.driver()->cuMemGetAddressRange(&base, &allocSize, ptr);
    if (res != CUDA_SUCCESS) {
      throw AgentError{"TANDEM_BAD_ARGUMENT", "address 0x" + [&] {
        std::ostringstream o;
        o << std::hex << ptr;
        return o.str();
      }() + " is not device memory of this process: " + cuda_.driver()->describe(res)};
    }
    if (ptr + size > base + allocSize) {
      throw AgentError{"TANDEM_OUT_OF_BOUNDS", "device region of " + std::to_string(size) + " bytes runs past the end of its allocation (" +
                                                   std::to_string(base + allocSize - ptr) + " bytes left)"};
    }
    int ordinal = -1;
    if (cuda_.driver()->cuPointerGetAttribute(&ordinal, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr) == CUDA_SUCCESS && ordinal != device) {
      throw AgentError{"TANDEM_BAD_ARGUMENT", "address belongs to CUDA device " + std::to_string(ordinal) + ", not " + std::to_string(device)};
    }
    CUipcMemHandle handle{};
    if (cuda_.driver()->cuIpcGetMemHandle(&handle, base) == CUDA_SUCCESS) {
      r->desc.hasIpcHandle = true;
      r->desc.ipcOffset = ptr - base;
      std::memcpy(r->desc.ipcHandle, handle.reserved, sizeof(handle.reserved));
    }
    return 0;
  });
  std::lock_guard<std::mutex> lock(mutex_);
  r->id = nextRegionId_++;
  ++generation_;
  r->desc.id = r->id;
  regions_[r->id] = r;
  return r;
}

std::shared_ptr<Region> Agent::allocDevice(int device, uint64_t size) {
  if (!cuda_.available()) {
    throw AgentError{"TANDEM_CUDA_UNAVAILABLE", "CUDA unavailable: " + cuda_.reason()};
  }
  CUdeviceptr ptr = onProgress([&] {
    cuda_.setDevice(device);
    CUdeviceptr p = 0;
    cuda_.check(cuda_.driver()->cuMemAlloc(&p, size), "cuMemAlloc");
    return p;
  });
  try {
    return registerDevice(device, ptr, size, true);
  } catch (...) {
    onProgress([&] {
      cuda_.driver()->cuMemFree(ptr);
      return 0;
    });
    throw;
  }
}

void Agent::deregister(uint32_t id) {
  std::shared_ptr<Region> r;
  std::vector<std::shared_ptr<Connection>> inbound;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = regions_.find(id);
    if (it == regions_.end()) throw AgentError{"TANDEM_NOT_REGISTERED", "region " + std::to_string(id) + " is not registered"};
    r = it->second;
    regions_.erase(it);
    ++generation_;
    for (const auto& c : connections_) {
      if (c->inbound && c->greeted && c->open) inbound.push_back(c);
    }
  }
  // Peers that reach the region without asking this agent (shm mappings, UCX keys) hear that it is gone;
  // those that ask (tcp, nccl) are refused by the region check there.
  if (!inbound.empty()) {
    progress_->post([inbound, id] {
      std::string ignored;
      for (const auto& c : inbound) sendMessage(*c, Msg::RegionGone, id, 0, nullptr, 0, ignored);
    });
  }
  for (auto& b : backends_) b->regionDeregistered(*r);
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
        cuda_.setDevice(r->device);
        cuda_.driver()->cuMemFree(r->dev);
        r->dev = 0;
      }
      if (r->mapping && r->mapping->cudaRegistered) {
        cuda_.setDevice(0);
        cuda_.driver()->cuMemHostUnregister(r->mapping->base);
        r->mapping->cudaRegistered = false;
      }
      return 0;
    });
  }
}

int Agent::firstDeviceRegion() {
  int device = -1;
  std::lock_guard<std::mutex> lock(mutex_);
  for (const auto& [id, r] : regions_) {
    if (r->kind == MemKind::Device && (device < 0 || r->device < device)) device = r->device;
  }
  return device;
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
  for (const auto& b : backends_) b->describe(d);
  std::lock_guard<std::mutex> lock(mutex_);
  d.generation = generation_;
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
        // Same peer: its regions become exactly those of this metadata, unless what we hold is newer
        // (a stale blob changes nothing). A region it no longer lists is gone; one whose descriptor
        // changed is a new region (the old one gone).
        auto existing = it->second;
        std::vector<std::shared_ptr<RemoteRegion>> gone;
        {
          std::lock_guard<std::mutex> peerLock(existing->mutex);
          if (d.generation < existing->generation) return existing;
          std::vector<std::shared_ptr<RemoteRegion>> regions;
          std::unordered_map<uint32_t, std::shared_ptr<RemoteRegion>> byId;
          for (const auto& r : d.regions) {
            if (existing->goneIds.count(r.id)) continue;  // ids are never reused: gone is gone
            auto old = existing->regionById.find(r.id);
            std::shared_ptr<RemoteRegion> region;
            if (old != existing->regionById.end() && sameRegion(old->second->d, r)) {
              region = old->second;
            } else {
              region = std::make_shared<RemoteRegion>(r);
            }
            byId[r.id] = region;
            regions.push_back(std::move(region));
          }
          for (const auto& old : existing->regions) {
            auto now = byId.find(old->d.id);
            if (now != byId.end() && now->second == old) continue;
            old->gone.store(true, std::memory_order_release);
            if (now == byId.end()) existing->goneIds[old->d.id] = true;
            gone.push_back(old);
          }
          existing->regions = std::move(regions);
          existing->regionById = std::move(byId);
          existing->generation = d.generation;
        }
        if (!gone.empty()) {
          progress_->post([this, existing, gone = std::move(gone)]() mutable { releaseRegions(existing, std::move(gone)); });
        }
        return existing;
      }
      old = it->second;  // a restarted peer with the same name: a new peer
    }
    peer->d = d;
    peer->generation = d.generation;
    peer->sameHost = d.hostKey == hostKey_;
    for (const auto& r : d.regions) {
      auto region = std::make_shared<RemoteRegion>(r);
      peer->regionById[r.id] = region;
      peer->regions.push_back(std::move(region));
    }
    for (auto& b : backends_) peer->backendState[static_cast<size_t>(b->id())] = b->openPeer(*peer);
    peers_[d.name] = peer;
  }
  if (old) markDead(old, "peer '" + old->d.name + "' was replaced by a new incarnation");
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

std::string Agent::unreachableCode(Peer& peer) {
  std::lock_guard<std::mutex> lock(peer.mutex);
  return peer.dead ? peer.deadCode : "TANDEM_REMOTE_DISCONNECTED";
}

void Agent::markDead(const std::shared_ptr<Peer>& peer, const std::string& reason, const std::string& code) {
  std::shared_ptr<Connection> conn;
  {
    std::lock_guard<std::mutex> lock(peer->mutex);
    if (!peer->dead) {
      peer->dead = true;
      peer->deadReason = reason;
      peer->deadCode = code;
    }
    peer->connecting = false;
    conn = peer->conn;
    peer->connected.notify_all();
  }
  if (conn) conn->shutdown();
  for (auto& b : backends_) b->closePeer(*peer, closing_);
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
      conn->inbound = true;
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
  Hello hello;
  if (!recvAll(conn->fd, payload.data(), payload.size(), error) || !parseHello(payload, hello)) {
    conn->shutdown();
    return;
  }
  conn->peerIncarnation = hello.incarnation;
  conn->peerName = hello.name;
  // Who may connect. The peer hears why it was refused (Msg::Refused); this agent goes on serving others.
  auto refuse = [&](const std::string& why) {
    std::string ignored;
    sendMessage(*conn, Msg::Refused, 0, 0, why.data(), why.size(), ignored);
    conn->shutdown();
  };
  sockaddr_storage local{};
  socklen_t localLen = sizeof(local);
  const bool unixSocket =
      getsockname(conn->fd, reinterpret_cast<sockaddr*>(&local), &localLen) == 0 && local.ss_family == AF_UNIX;
  // Local peers: the abstract socket has no file permissions and the loopback listener none either, so
  // any local process can connect; its uid decides (SO_PEERCRED; /proc/net/tcp for loopback tcp).
  uint32_t uid = 0;
  bool localPeer = false;
  if (unixSocket) {
    ucred cred{};
    socklen_t credLen = sizeof(cred);
    if (getsockopt(conn->fd, SOL_SOCKET, SO_PEERCRED, &cred, &credLen) != 0) return refuse("its credentials could not be read");
    uid = static_cast<uint32_t>(cred.uid);
    localPeer = true;
  } else if (!loopbackPeerUid(conn->fd, uid, localPeer) && localPeer) {
    return refuse("the uid of its loopback connection could not be found in /proc/net");
  }
  if (localPeer) {
    const auto& allowed = options_.allowedUids;
    if (uid != static_cast<uint32_t>(geteuid()) && std::find(allowed.begin(), allowed.end(), uid) == allowed.end()) {
      return refuse("agent '" + options_.name + "' accepts local peers of uid " + std::to_string(geteuid()) +
                    (allowed.empty() ? std::string() : " and its allowedUids") + "; '" + hello.name + "' runs as uid " +
                    std::to_string(uid) + " (add it to allowedUids / TANDEM_TRANSFER_ALLOWED_UIDS to let it in)");
    }
  }
  const bool authenticating = !options_.secret.empty();
  if (authenticating && !hello.hasNonce) {
    return refuse("agent '" + options_.name + "' requires the shared secret (TANDEM_TRANSFER_SECRET); '" + hello.name +
                  "' has none set");
  }
  // Polled notifications: an inbox for this connection, with a ring in shared memory when the initiator
  // is on this host (it came over the unix socket). The HelloAck names the ring's fd (plus one; 0: none).
  uint32_t ringFd = 0;
  if (options_.pollNotifications) {
    auto inbox = std::make_shared<Inbox>();
    inbox->from = conn->peerName;
    if (unixSocket) {
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
  auth::Nonce ourNonce{};
  auth::Proof ourProof{};
  if (authenticating) {
    ourNonce = auth::nonce();
    ourProof = auth::proof(options_.secret, "target", hello.nonce, ourNonce);
  }
  auto ack = authenticating ? helloPayload(incarnation_, options_.name, &ourNonce, &ourProof)
                            : helloPayload(incarnation_, options_.name);
  if (authenticating) {
    // The initiator proves it holds the secret before anything it sends is served.
    std::string ackError;
    if (!sendMessage(*conn, Msg::HelloAck, ringFd, h.seq, ack.data(), ack.size(), ackError)) {
      conn->shutdown();
      return;
    }
    auth::Proof theirs{};
    if (!recvAll(conn->fd, &h, sizeof(h), error)) {
      conn->shutdown();
      return;
    }
    if (h.type != static_cast<uint32_t>(Msg::Auth) || h.length != theirs.size() ||
        !recvAll(conn->fd, theirs.data(), theirs.size(), error) ||
        !auth::same(theirs, auth::proof(options_.secret, "initiator", hello.nonce, ourNonce))) {
      return refuse("agent '" + options_.name + "' refused '" + hello.name + "': it did not prove the shared secret");
    }
    conn->greeted = true;
  }
  if (!authenticating) {
    // Under the send lock, so that nothing (RegionGone) goes out before the HelloAck.
    std::lock_guard<std::mutex> lock(conn->sendMutex);
    Header ackHeader{static_cast<uint32_t>(Msg::HelloAck), ringFd, h.seq, ack.size()};
    std::vector<iovec> iov{{&ackHeader, sizeof(ackHeader)}, {ack.data(), ack.size()}};
    if (!sendVector(conn->fd, iov, error)) {
      conn->shutdown();
      return;
    }
    conn->greeted = true;
  }

  // Each backend's state for this connection (nccl: its links), made by the backend on first use.
  std::array<std::unique_ptr<BackendInboundState>, kBackendCount> inbound;
  while (!closing_) {
    spinUntilReadable(conn->fd, spin_);
    if (!recvAll(conn->fd, &h, sizeof(h), error)) break;
    Msg type = static_cast<Msg>(h.type);
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
    // Requests go to the backend that serves them (tcp: WriteData/ReadRequest; nccl: NcclInit/Plan/Post).
    TransferBackend* server = nullptr;
    for (auto& b : backends_) {
      if (b->serves(type)) {
        server = b.get();
        break;
      }
    }
    if (!server || !server->serve(conn, h, inbound[static_cast<size_t>(server->id())], error)) break;  // protocol violation
  }
  conn->shutdown();
  for (auto& state : inbound) state.reset();
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
  const bool authenticating = !options_.secret.empty();
  const auth::Nonce ourNonce = authenticating ? auth::nonce() : auth::Nonce{};
  auto hello = authenticating ? helloPayload(incarnation_, options_.name, &ourNonce) : helloPayload(incarnation_, options_.name);
  Header h{};
  std::vector<unsigned char> payload;
  Hello ack;
  bool ok = sendMessage(*conn, Msg::Hello, 0, 0, hello.data(), hello.size(), error) && recvAll(fd, &h, sizeof(h), error) &&
            (h.type == static_cast<uint32_t>(Msg::HelloAck) || h.type == static_cast<uint32_t>(Msg::Refused)) &&
            h.length <= 4096;
  if (ok) {
    payload.resize(h.length);
    ok = recvAll(fd, payload.data(), payload.size(), error);
  }
  if (ok && h.type == static_cast<uint32_t>(Msg::Refused)) {
    markDead(peer, "peer '" + peer->d.name + "' refused this agent: " + std::string(payload.begin(), payload.end()),
             "TANDEM_PEER_REJECTED");
    return;
  }
  if (ok) ok = parseHello(payload, ack);
  if (!ok) {
    markDead(peer, "handshake with peer '" + peer->d.name + "' failed: " + (error.empty() ? "protocol error" : error));
    return;
  }
  if (authenticating) {
    // The target proves the secret first; only then does this agent prove it (and trust the connection).
    if (!ack.hasProof) {
      markDead(peer, "peer '" + peer->d.name + "' does not authenticate (it has no shared secret set); this agent has one: set the same TANDEM_TRANSFER_SECRET on both",
               "TANDEM_PEER_REJECTED");
      return;
    }
    if (!auth::same(ack.proof, auth::proof(options_.secret, "target", ourNonce, ack.nonce))) {
      markDead(peer, "peer '" + peer->d.name + "' did not prove this agent's shared secret (the two have different secrets)",
               "TANDEM_PEER_REJECTED");
      return;
    }
    const auth::Proof ours = auth::proof(options_.secret, "initiator", ourNonce, ack.nonce);
    if (!sendMessage(*conn, Msg::Auth, 0, 0, ours.data(), ours.size(), error)) {
      markDead(peer, "handshake with peer '" + peer->d.name + "' failed: " + error);
      return;
    }
  } else if (ack.hasProof) {
    markDead(peer, "peer '" + peer->d.name + "' authenticates with a shared secret and this agent has none", "TANDEM_PEER_REJECTED");
    return;
  }
  if (ack.incarnation != peer->d.incarnation) {
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
    if (type == Msg::Refused) {  // it did not accept our proof
      std::string text(std::min<uint64_t>(h.length, 4096), '\0');
      if (!recvAll(fd, text.data(), text.size(), error)) break;
      markDead(peer, "peer '" + peer->d.name + "' refused this agent: " + text, "TANDEM_PEER_REJECTED");
      return;
    }
    if (type == Msg::RegionGone) {
      if (h.length && !discard(fd, h.length, error)) break;
      regionGone(peer, h.aux, "it was deregistered there");
      continue;
    }
    if (type != Msg::Done && type != Msg::ReadData) break;
    // The post this answers (it may have been canceled or timed out meanwhile: then tcp's rules apply,
    // which read and drop the answer).
    std::shared_ptr<Plan> plan = pendingPlan(h.seq);
    TransferBackend& answerer = backend(plan ? plan->backend : Backend::Tcp);
    if (!answerer.answer(peer, *conn, h, plan, error)) break;
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
    if (peer->dead) throw AgentError{peer->deadCode, peer->deadReason};
  }
  if (count == 0) throw AgentError{"TANDEM_BAD_DESCRIPTOR", "a transfer needs at least one piece"};
  if (localRegions.empty() || remoteRegions.empty()) throw AgentError{"TANDEM_BAD_DESCRIPTOR", "a transfer needs a local and a remote region"};

  std::vector<std::shared_ptr<Region>> locals;
  for (uint32_t id : localRegions) {
    auto r = region(id);
    if (!r) throw AgentError{"TANDEM_NOT_REGISTERED", "local region " + std::to_string(id) + " is not registered"};
    locals.push_back(r);
  }
  std::vector<std::shared_ptr<RemoteRegion>> remotes;
  {
    std::lock_guard<std::mutex> lock(peer->mutex);
    for (uint32_t id : remoteRegions) {
      auto it = peer->regionById.find(id);
      if ((it == peer->regionById.end() && peer->goneIds.count(id)) ||
          (it != peer->regionById.end() && it->second->gone.load(std::memory_order_acquire))) {
        throw AgentError{"TANDEM_REMOTE_REGION_GONE", goneMessage(*peer, id)};
      }
      if (it == peer->regionById.end()) {
        throw AgentError{"TANDEM_NOT_REGISTERED", "peer '" + peerName + "' has no region " + std::to_string(id) +
                                                      " in the metadata loaded (reload its metadata after it registers)"};
      }
      remotes.push_back(it->second);
    }
  }
  bool localDevice = locals[0]->kind == MemKind::Device;
  bool remoteDevice = remotes[0]->d.kind == MemKind::Device;
  for (auto& r : locals) {
    if ((r->kind == MemKind::Device) != localDevice) throw AgentError{"TANDEM_BAD_DESCRIPTOR", "local regions mix device and host memory"};
  }
  for (auto& r : remotes) {
    if ((r->d.kind == MemKind::Device) != remoteDevice) {
      throw AgentError{"TANDEM_BAD_DESCRIPTOR", "remote regions mix device and host memory"};
    }
  }

  // Backend: the caller's choice, or the best one for this pair.
  const PlanShape shape{*peer, peerName, locals, remotes, localDevice, remoteDevice};
  Backend backend;
  if (!backendName.empty()) {
    if (!parseBackend(backendName, backend)) throw AgentError{"TANDEM_BAD_ARGUMENT", "unknown backend '" + backendName + "'"};
  } else {
    backend = chooseBackend(shape);
  }
  this->backend(backend).checkPlan(shape);

  auto plan = std::make_shared<Plan>();
  plan->op = op;
  plan->backend = backend;
  plan->peer = peer;
  plan->localRegionIds = localRegions;
  plan->remotes = remotes;
  plan->piecesBeforeCoalescing = count;
  if (remoteDevice) plan->remoteDevice = remotes[0]->d.device;
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
    const auto& rr = remotes[ri]->d;
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
    Piece p{base + lo, ro, len, ri, l->id};
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
  {
    std::lock_guard<std::mutex> lock(mutex_);
    plan->id = nextPlanId_++;
  }
  plan->state = this->backend(backend).preparePlan(*plan);
  return plan;
}

// The backends in the order a pair tries them when the caller names none. Each entry is taken on its
// capabilities (TransferBackend: memory kinds on each side, same host or not, available here and at the
// peer): host memory goes through shm on one host, else ucx where both have it, else tcp; device memory
// through cuda-ipc on one host, else nccl.
constexpr Backend kPreference[] = {Backend::Shm, Backend::Ucx, Backend::Tcp, Backend::CudaIpc, Backend::Nccl};

Backend Agent::chooseBackend(const PlanShape& shape) const {
  auto moves = [&](const TransferBackend& b) {
    uint32_t local = 0, remote = 0;
    for (const auto& r : shape.locals) local |= memBit(r->kind);
    for (const auto& r : shape.remotes) remote |= memBit(r->d.kind);
    if ((local & ~b.localMems()) || (remote & ~b.remoteMems())) return false;
    return !b.needsDevice() || shape.localDevice || shape.remoteDevice;
  };
  auto reaches = [&](const TransferBackend& b) { return shape.peer.sameHost ? b.supportsLocal() : b.supportsRemote(); };
  auto live = [&](const TransferBackend& b) { return b.unavailableReason().empty() && (shape.peer.d.backends & b.bit()); };
  // The first that can run; else the first that would fit the pair, so that its check says what is missing.
  for (Backend id : kPreference) {
    if (moves(backend(id)) && reaches(backend(id)) && live(backend(id))) return id;
  }
  for (Backend id : kPreference) {
    if (moves(backend(id)) && reaches(backend(id))) return id;
  }
  for (Backend id : kPreference) {
    if (moves(backend(id))) return id;
  }
  return shape.localDevice || shape.remoteDevice ? Backend::CudaIpc : Backend::Tcp;
}

// ---------------------------------------------------------------------------------------------------
// Post

void Agent::fail(uint64_t token, const std::string& code, const std::string& message) {
  callbacks_.completed(token, false, code, message);
}

void Agent::succeed(uint64_t token) { callbacks_.completed(token, true, "", ""); }

void Agent::addPending(uint64_t token, const std::shared_ptr<Plan>& plan, std::vector<unsigned char> notif,
                       size_t answers) {
  Pending p;
  p.plan = plan;
  p.peer = plan->peer;
  p.notif = std::move(notif);
  p.deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.timeoutMs);
  p.answers = answers;
  std::lock_guard<std::mutex> lock(mutex_);
  pending_[token] = std::move(p);
}

bool Agent::erasePending(uint64_t token) {
  std::lock_guard<std::mutex> lock(mutex_);
  return pending_.erase(token) > 0;
}

std::shared_ptr<Plan> Agent::pendingPlan(uint64_t token) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = pending_.find(token);
  return it == pending_.end() ? nullptr : it->second.plan;
}

bool Agent::takeAnswer(uint64_t token, size_t& index, bool& last, std::vector<unsigned char>* notif,
                       std::shared_ptr<Plan>* plan, std::shared_ptr<Peer>* peer, bool eraseOnLast) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = pending_.find(token);
  if (it == pending_.end() || it->second.answered >= it->second.answers) return false;
  index = it->second.answered++;
  last = it->second.answered == it->second.answers;
  if (plan) *plan = it->second.plan;
  if (peer) *peer = it->second.peer;
  if (last) {
    if (notif) *notif = eraseOnLast ? std::move(it->second.notif) : it->second.notif;
    if (eraseOnLast) pending_.erase(it);
  }
  return true;
}

void Agent::cancel(uint64_t token) {
  bool wasPending = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    wasPending = pending_.erase(token) > 0;
    if (!wasPending) canceled_[token] = true;
  }
  if (wasPending) fail(token, "TANDEM_CANCELED", "the transfer was canceled (data already sent may have landed)");
}

bool Agent::post(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char> notif, bool alone) {
  TransferBackend& b = backend(plan->backend);
  if (const RemoteRegion* gone = goneRegion(*plan)) {
    fail(token, "TANDEM_REMOTE_REGION_GONE", goneMessage(*plan->peer, gone->d.id));
    return false;
  }
  // Done or issued on this thread (a small shm copy, a cuda-ipc post of a settled plan): no hand-off.
  bool settled = false;
  if (b.postOnCaller(plan, token, notif, alone, settled)) return settled;
  b.queued(*plan);
  bool queued = progress_->post([this, plan, token, notif = std::move(notif)]() mutable {
    TransferBackend& b = backend(plan->backend);
    struct Issued {
      TransferBackend& backend;
      Plan& plan;
      ~Issued() { backend.dequeued(plan); }
    } issued{b, *plan};
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
    if (const RemoteRegion* gone = goneRegion(*plan)) {
      fail(token, "TANDEM_REMOTE_REGION_GONE", goneMessage(*plan->peer, gone->d.id));
      return;
    }
    try {
      b.post(plan, token, notif);
    } catch (const AgentError& e) {
      fail(token, e.code, e.message);
    }
  });
  if (!queued) {
    b.dequeued(*plan);
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
    if (!sendNotify(peer, message, error)) return fail(token, unreachableCode(*peer), error);
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
  static_cast<CudaIpcBackend&>(backend(Backend::CudaIpc)).warmup(peer, token);
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
  auto gone = [&](const std::string& why) {
    {
      std::lock_guard<std::mutex> lock(peer.mutex);
      if (!r.gone.exchange(true)) {
        auto it = peer.regionById.find(r.d.id);
        if (it != peer.regionById.end() && it->second.get() == &r) peer.goneIds[r.d.id] = true;
      }
    }
    return AgentError{"TANDEM_REMOTE_REGION_GONE", goneMessage(peer, r.d.id) + " (" + why + ")"};
  };
  std::string path = "/proc/" + std::to_string(peer.d.pid) + "/fd/" + std::to_string(r.d.memfd);
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    // The fd is closed (the region was deregistered) while the process lives; or the process is gone.
    if (err == ENOENT && ::access(("/proc/" + std::to_string(peer.d.pid)).c_str(), F_OK) == 0) {
      throw gone("its memfd is closed");
    }
    throw AgentError{err == ENOENT ? "TANDEM_REMOTE_DISCONNECTED" : "TANDEM_BACKEND_UNAVAILABLE",
                     "cannot open region " + std::to_string(r.d.id) + " of peer '" + peer.d.name + "' (" + path + "): " +
                         std::strerror(err)};
  }
  // The fd number may have been reused for another file since the metadata was made: map only the file
  // the metadata describes, and never past its end (a mapping longer than the file faults with SIGBUS).
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw AgentError{"TANDEM_BACKEND_UNAVAILABLE", "cannot stat region " + std::to_string(r.d.id) + " of peer '" +
                                                       peer.d.name + "': " + std::strerror(err)};
  }
  const bool sameFile = r.d.inode == 0 || (static_cast<uint64_t>(st.st_ino) == r.d.inode &&
                                           static_cast<uint64_t>(st.st_dev) == r.d.fileDevice);
  if (!sameFile || static_cast<uint64_t>(st.st_size) < r.d.size) {
    ::close(fd);
    throw gone(sameFile ? "its file is smaller than the metadata says" : "its memfd now names another file");
  }
  void* p = mmap(nullptr, r.d.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) {
    throw AgentError{"TANDEM_BACKEND_UNAVAILABLE", "cannot map region " + std::to_string(r.d.id) + " of peer '" + peer.d.name +
                                                       "': " + std::strerror(errno)};
  }
  std::lock_guard<std::mutex> lock(peer.mutex);  // the caller's thread reads it there (shm inline copies)
  r.mapped = static_cast<unsigned char*>(p);
  r.mappedSize = r.d.size;
  return r.mapped;
}

std::string Agent::goneMessage(const Peer& peer, uint32_t id) {
  return "region " + std::to_string(id) + " of peer '" + peer.d.name +
         "' is gone (deregistered there); nothing was moved. Load the peer's metadata again and prepare anew";
}

const RemoteRegion* Agent::goneRegion(const Plan& plan) {
  for (const auto& r : plan.remotes) {
    if (!r->gone.load(std::memory_order_acquire)) continue;
    // A dead peer is reported as such (RemoteDisconnectError, by the backend), whatever it had removed.
    std::lock_guard<std::mutex> lock(plan.peer->mutex);
    return plan.peer->dead ? nullptr : r.get();
  }
  return nullptr;
}

std::string Agent::regionGone(const std::shared_ptr<Peer>& peer, uint32_t id, const std::string& why) {
  std::vector<std::shared_ptr<RemoteRegion>> gone;
  {
    std::lock_guard<std::mutex> lock(peer->mutex);
    auto it = peer->regionById.find(id);
    if (it != peer->regionById.end()) {
      it->second->gone.store(true, std::memory_order_release);
      gone.push_back(it->second);
      peer->regions.erase(std::remove(peer->regions.begin(), peer->regions.end(), it->second), peer->regions.end());
      peer->regionById.erase(it);
    }
    peer->goneIds[id] = true;
  }
  if (!gone.empty() && !closing_) {
    progress_->post([this, peer, gone = std::move(gone)]() mutable { releaseRegions(peer, std::move(gone)); });
  }
  return goneMessage(*peer, id) + " (" + why + ")";
}

void Agent::releaseRegions(const std::shared_ptr<Peer>& peer, std::vector<std::shared_ptr<RemoteRegion>> regions) {
  // On the progress thread, after the posts queued before the region went: none is issued with it now.
  const bool otherProcess = peer->d.pid != static_cast<uint32_t>(getpid());
  for (auto& r : regions) {
    for (auto& b : backends_) b->releaseRegion(*peer, *r);
    std::lock_guard<std::mutex> lock(peer->mutex);  // against the shm copies on the caller's thread
    if (r->mapped && r->mappedSize && otherProcess) munmap(r->mapped, r->mappedSize);
    r->mapped = nullptr;
    r->mappedSize = 0;
  }
}

}  // namespace tandem::transfer
