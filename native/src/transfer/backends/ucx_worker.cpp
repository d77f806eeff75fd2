#include "ucx_worker.h"

#include "../../dynlib.h"
#include "../agent.h"

#if __has_include(<ucp/api/ucp.h>)
#define TANDEM_HAVE_UCX_HEADERS 1
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <future>
#include <list>
#include <map>
#include <mutex>
#include <sstream>
#include <system_error>
#include <thread>
#include <unordered_map>
#else
#define TANDEM_HAVE_UCX_HEADERS 0
#endif

namespace tandem::transfer {

#if TANDEM_HAVE_UCX_HEADERS

namespace {

// Every ucp entry point the backend calls, resolved from the loaded libucp. ucp_init() is a static
// inline wrapper in the headers, so its exported target ucp_init_version is resolved instead (with the
// headers' UCP_API_MAJOR/MINOR, which pins the 1.13 struct layouts on newer runtimes).
#define TANDEM_UCP_FUNCTIONS(X)                                                                      \
  X(ucp_get_version) X(ucp_config_read) X(ucp_config_modify) X(ucp_config_release) X(ucp_init_version) \
  X(ucp_cleanup)                                                                                     \
  X(ucp_context_print_info) X(ucp_worker_create) X(ucp_worker_destroy) X(ucp_worker_get_address)     \
  X(ucp_worker_release_address) X(ucp_worker_progress) X(ucp_worker_get_efd) X(ucp_worker_arm)       \
  X(ucp_ep_create) X(ucp_ep_close_nbx) X(ucp_ep_flush_nbx) X(ucp_mem_map) X(ucp_mem_unmap)           \
  X(ucp_rkey_pack) X(ucp_rkey_buffer_release) X(ucp_ep_rkey_unpack) X(ucp_rkey_destroy) X(ucp_put_nbx) \
  X(ucp_get_nbx) X(ucp_request_check_status) X(ucp_request_free)

struct UcpApi {
#define TANDEM_UCP_MEMBER(name) decltype(&::name) name = nullptr;
  TANDEM_UCP_FUNCTIONS(TANDEM_UCP_MEMBER)
#undef TANDEM_UCP_MEMBER
  decltype(&::ucp_mem_query) ucp_mem_query = nullptr;          // optional: memory type of a region
  decltype(&::ucs_status_string) ucs_status_string = nullptr;  // optional (libucs): status text
};

// Bounds of the progress loop. Spinning keeps latency low while transfers complete; past the window
// the thread sleeps in epoll until UCX or the command queue has something.
constexpr auto kSpinWhileInFlight = std::chrono::microseconds(50);
constexpr auto kSpinWhenIdle = std::chrono::microseconds(20);
// Safety nets for transports that do not raise events for every completion, and for UCX timers.
constexpr int kWaitInFlightMs = 1;
constexpr int kWaitIdleMs = 100;
constexpr unsigned kProgressRounds = 32;  // ucp_worker_progress calls per loop while it makes progress
constexpr size_t kIssueBudget = 4096;     // operations issued per loop, so completions interleave
constexpr size_t kMaxCachedRkeys = 1024;  // per endpoint; the cache is dropped when full and idle
constexpr auto kShutdownDrain = std::chrono::seconds(5);
// UCX checks peers every KEEPALIVE_INTERVAL (default 20 s). Transports that cannot see a peer die by
// themselves (shared memory, or a one-sided transport with nothing in flight) rely on it, so the
// backend shortens it unless UCX_KEEPALIVE_INTERVAL is set: a dead peer's posts fail in a few seconds.
constexpr const char* kKeepaliveInterval = "2s";

const char* statusName(ucs_status_t s) {
  switch (s) {
    case UCS_OK: return "UCS_OK";
    case UCS_INPROGRESS: return "UCS_INPROGRESS";
    case UCS_ERR_NO_MESSAGE: return "UCS_ERR_NO_MESSAGE";
    case UCS_ERR_NO_RESOURCE: return "UCS_ERR_NO_RESOURCE";
    case UCS_ERR_IO_ERROR: return "UCS_ERR_IO_ERROR";
    case UCS_ERR_NO_MEMORY: return "UCS_ERR_NO_MEMORY";
    case UCS_ERR_INVALID_PARAM: return "UCS_ERR_INVALID_PARAM";
    case UCS_ERR_UNREACHABLE: return "UCS_ERR_UNREACHABLE";
    case UCS_ERR_INVALID_ADDR: return "UCS_ERR_INVALID_ADDR";
    case UCS_ERR_NOT_IMPLEMENTED: return "UCS_ERR_NOT_IMPLEMENTED";
    case UCS_ERR_MESSAGE_TRUNCATED: return "UCS_ERR_MESSAGE_TRUNCATED";
    case UCS_ERR_NO_PROGRESS: return "UCS_ERR_NO_PROGRESS";
    case UCS_ERR_BUFFER_TOO_SMALL: return "UCS_ERR_BUFFER_TOO_SMALL";
    case UCS_ERR_NO_ELEM: return "UCS_ERR_NO_ELEM";
    case UCS_ERR_SOME_CONNECTS_FAILED: return "UCS_ERR_SOME_CONNECTS_FAILED";
    case UCS_ERR_NO_DEVICE: return "UCS_ERR_NO_DEVICE";
    case UCS_ERR_BUSY: return "UCS_ERR_BUSY";
    case UCS_ERR_CANCELED: return "UCS_ERR_CANCELED";
    case UCS_ERR_SHMEM_SEGMENT: return "UCS_ERR_SHMEM_SEGMENT";
    case UCS_ERR_ALREADY_EXISTS: return "UCS_ERR_ALREADY_EXISTS";
    case UCS_ERR_OUT_OF_RANGE: return "UCS_ERR_OUT_OF_RANGE";
    case UCS_ERR_TIMED_OUT: return "UCS_ERR_TIMED_OUT";
    case UCS_ERR_EXCEEDS_LIMIT: return "UCS_ERR_EXCEEDS_LIMIT";
    case UCS_ERR_UNSUPPORTED: return "UCS_ERR_UNSUPPORTED";
    case UCS_ERR_REJECTED: return "UCS_ERR_REJECTED";
    case UCS_ERR_NOT_CONNECTED: return "UCS_ERR_NOT_CONNECTED";
    case UCS_ERR_CONNECTION_RESET: return "UCS_ERR_CONNECTION_RESET";
    case UCS_ERR_ENDPOINT_TIMEOUT: return "UCS_ERR_ENDPOINT_TIMEOUT";
    default: break;
  }
  if (UCS_IS_LINK_ERROR(s)) return "UCS_ERR_LINK_FAILURE";
  if (UCS_IS_ENDPOINT_ERROR(s)) return "UCS_ERR_ENDPOINT_FAILURE";
  return nullptr;
}

// "Connection reset by remote peer (UCS_ERR_CONNECTION_RESET)"
std::string describe(const UcpApi& api, ucs_status_t s) {
  std::string text = api.ucs_status_string ? api.ucs_status_string(s) : "UCX error";
  const char* name = statusName(s);
  text += " (";
  text += name ? name : "UCS status";
  if (!name || UCS_IS_LINK_ERROR(s) || UCS_IS_ENDPOINT_ERROR(s)) text += " " + std::to_string(static_cast<int>(s));
  text += ")";
  return text;
}

std::string hexAddress(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

// A registration of local memory. Owned by the progress thread (and by the transfers that use it, so
// that an early deregister cannot unmap memory an operation in flight still names).
struct UcxRegion {
  const UcpApi* api = nullptr;
  ucp_context_h context = nullptr;
  ucp_mem_h memh = nullptr;
  uint32_t id = 0;
  uintptr_t base = 0;
  size_t size = 0;
  bool hasMemType = false;
  ucs_memory_type_t memType = UCS_MEMORY_TYPE_HOST;

  ~UcxRegion() {
    if (memh) api->ucp_mem_unmap(context, memh);
  }
  bool covers(uintptr_t p, uint64_t n) const { return p >= base && n <= size && p - base <= size - n; }
};

// One endpoint to a peer. A failed or unconnectable peer stays in the map without an endpoint, so that
// its posts fail with the reason until connect() is called again.
struct UcxPeer : std::enable_shared_from_this<UcxPeer> {
  const UcpApi* api = nullptr;
  std::vector<std::shared_ptr<UcxPeer>>* failedPeers = nullptr;  // where the error handler reports
  std::string key;
  std::vector<uint8_t> address;
  ucp_ep_h ep = nullptr;
  bool closing = false;  // close started: later error callbacks are ignored
  std::string failure;   // why posts to this peer fail (no endpoint, or it failed)
  std::unordered_map<std::string, ucp_rkey_h> rkeys;  // packed key bytes -> key unpacked on `ep`
  size_t inflight = 0;                                // transfers on this endpoint not yet drained

  void destroyRkeys() {
    for (auto& entry : rkeys) api->ucp_rkey_destroy(entry.second);
    rkeys.clear();
  }
};

// One post(). Lives until `done` was called and every UCX request it issued has completed (their
// callbacks point at it).
struct UcxTransfer {
  const UcpApi* api = nullptr;
  std::string peerKey;
  std::shared_ptr<UcxPeer> peer;  // set once started on an endpoint
  bool write = true;
  std::vector<UcxWorker::Piece> pieces;
  std::vector<std::vector<uint8_t>> packedRkeys;
  std::vector<ucp_rkey_h> rkeys;                      // resolved lazily, index = rkeyIndex
  std::vector<std::shared_ptr<UcxRegion>> regions;  // local registrations its operations use
  UcxRegion* lastRegion = nullptr;
  std::function<void(bool, std::string)> done;
  size_t next = 0;         // next piece to issue
  size_t outstanding = 0;  // UCX requests not yet completed (operations and the flush)
  bool flushIssued = false;
  bool failed = false;
  bool reported = false;
  std::string error;

  void fail(const std::string& what) {
    if (failed) return;
    failed = true;
    error = std::string("UCX ") + (write ? "WRITE" : "READ") + " of " + std::to_string(pieces.size()) +
            " pieces " + (write ? "to" : "from") + " peer '" + peerKey + "' failed: " + what;
  }
};

void onOperationDone(void* request, ucs_status_t status, void* user) {
  auto* t = static_cast<UcxTransfer*>(user);
  --t->outstanding;
  if (status != UCS_OK) t->fail(std::string(t->write ? "put" : "get") + " completed with " + describe(*t->api, status));
  t->api->ucp_request_free(request);
}

void onFlushDone(void* request, ucs_status_t status, void* user) {
  auto* t = static_cast<UcxTransfer*>(user);
  --t->outstanding;
  if (status != UCS_OK) t->fail("endpoint flush completed with " + describe(*t->api, status));
  t->api->ucp_request_free(request);
}

// Called from ucp_worker_progress on the progress thread; the loop fails the posts and closes the endpoint.
void onEndpointError(void* arg, ucp_ep_h ep, ucs_status_t status) {
  auto* peer = static_cast<UcxPeer*>(arg);
  if (peer->closing || peer->ep != ep || !peer->failure.empty()) return;
  peer->failure = "endpoint failed: " + describe(*peer->api, status);
  peer->failedPeers->push_back(peer->shared_from_this());
}

struct UcxClosingEndpoint {
  void* request = nullptr;  // ucp_ep_close_nbx request still in progress
  std::shared_ptr<UcxPeer> peer;
};

}  // namespace

struct UcxWorker::Impl {
  UcpApi api;
  std::string libraryPath;
  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;
  int epollFd = -1;
  int wakeFd = -1;  // eventfd: the command queue has work
  std::vector<uint8_t> address;
  std::string transports;
  std::thread thread;

  std::mutex mutex;  // commands, accepting, stopRequested, writes to wakeFd
  std::deque<std::function<void()>> commands;
  bool accepting = true;
  bool stopRequested = false;

  // Progress thread only.
  bool stopping = false;
  std::map<uint32_t, std::shared_ptr<UcxRegion>> regionsById;
  std::multimap<uintptr_t, std::shared_ptr<UcxRegion>> regionsByBase;
  std::unordered_map<std::string, std::shared_ptr<UcxPeer>> peers;
  std::list<std::shared_ptr<UcxTransfer>> transfers;
  std::vector<std::shared_ptr<UcxPeer>> failedPeers;
  std::vector<UcxClosingEndpoint> closing;

  bool onProgressThread() const { return std::this_thread::get_id() == thread.get_id(); }

  void wake() {  // mutex held
    uint64_t one = 1;
    ssize_t n = ::write(wakeFd, &one, sizeof one);
    (void)n;  // EAGAIN only when the counter is saturated, i.e. a wake-up is already pending
  }

  bool enqueue(std::function<void()> command) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!accepting) return false;
    bool wasEmpty = commands.empty();
    commands.push_back(std::move(command));
    // The thread takes the whole queue at once, so only the first command after a take needs a wake-up.
    if (wasEmpty) wake();
    return true;
  }

  // Runs `fn` on the progress thread and waits for it; exceptions propagate. False when closed.
  template <typename F>
  bool runSync(F&& fn) {
    if (onProgressThread()) {
      fn();
      return true;
    }
    auto task = std::make_shared<std::packaged_task<void()>>(std::forward<F>(fn));
    auto finished = task->get_future();
    if (!enqueue([task] { (*task)(); })) return false;
    finished.get();
    return true;
  }

  // ---- progress thread ----

  void run(std::promise<std::string> ready) {
    pthread_setname_np(pthread_self(), "tandem-ucx");
    std::string error = open();
    if (!error.empty()) {
      teardown();
      ready.set_value(error);
      return;
    }
    ready.set_value("");
    loop();
    shutdown();
  }

  std::string open() {
    ucp_config_t* config = nullptr;
    ucs_status_t s = api.ucp_config_read(nullptr, nullptr, &config);
    if (s != UCS_OK) return "ucp_config_read failed: " + describe(api, s);
    if (!std::getenv("UCX_KEEPALIVE_INTERVAL")) {
      api.ucp_config_modify(config, "KEEPALIVE_INTERVAL", kKeepaliveInterval);  // best effort
    }
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED | UCP_PARAM_FIELD_NAME;
    // WAKEUP only adds event capabilities; it narrows transport selection for TAG, which is not asked for.
    params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
    params.mt_workers_shared = 0;  // context calls (mem_map, rkey_pack) are made on the progress thread too
    params.name = "tandem";
    s = api.ucp_init_version(UCP_API_MAJOR, UCP_API_MINOR, &params, config, &context);
    api.ucp_config_release(config);
    if (s != UCS_OK) {
      context = nullptr;
      return "ucp_init failed: " + describe(api, s);
    }
    transports = listTransports();

    ucp_worker_params_t workerParams{};
    workerParams.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    workerParams.thread_mode = UCS_THREAD_MODE_SINGLE;  // only this thread ever touches the worker
    s = api.ucp_worker_create(context, &workerParams, &worker);
    if (s != UCS_OK) {
      worker = nullptr;
      return "ucp_worker_create failed: " + describe(api, s);
    }
    ucp_address_t* workerAddress = nullptr;
    size_t length = 0;
    s = api.ucp_worker_get_address(worker, &workerAddress, &length);
    if (s != UCS_OK) return "ucp_worker_get_address failed: " + describe(api, s);
    const auto* bytes = reinterpret_cast<const uint8_t*>(workerAddress);
    address.assign(bytes, bytes + length);
    api.ucp_worker_release_address(worker, workerAddress);

    int workerFd = -1;
    s = api.ucp_worker_get_efd(worker, &workerFd);
    if (s != UCS_OK) return "ucp_worker_get_efd failed: " + describe(api, s);
    wakeFd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wakeFd < 0) return std::string("eventfd: ") + std::strerror(errno);
    epollFd = epoll_create1(EPOLL_CLOEXEC);
    if (epollFd < 0) return std::string("epoll_create1: ") + std::strerror(errno);
    for (int fd : {workerFd, wakeFd}) {
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.fd = fd;
      if (epoll_ctl(epollFd, EPOLL_CTL_ADD, fd, &ev) != 0) return std::string("epoll_ctl: ") + std::strerror(errno);
    }
    return "";
  }

  // The transports of the context's resources ("#  resource 1 : md 1 dev 1 flags -- tcp/lo"), in
  // UCX's order, without the loopback-only "self".
  std::string listTransports() {
    char* text = nullptr;
    size_t length = 0;
    FILE* stream = open_memstream(&text, &length);
    if (!stream) return "";
    api.ucp_context_print_info(context, stream);
    std::fclose(stream);
    if (!text) return "";
    std::vector<std::string> names;
    std::istringstream lines(std::string(text, length));
    std::free(text);
    std::string line;
    while (std::getline(lines, line)) {
      if (line.find("resource") == std::string::npos) continue;
      auto dashes = line.find("-- ");
      if (dashes == std::string::npos) continue;
      std::string resource = line.substr(dashes + 3);
      std::string name = resource.substr(0, resource.find('/'));
      while (!name.empty() && (name.back() == ' ' || name.back() == '\r')) name.pop_back();
      if (name.empty() || name == "self") continue;
      bool seen = false;
      for (const auto& n : names) seen = seen || n == name;
      if (!seen) names.push_back(name);
    }
    std::string joined;
    for (const auto& n : names) joined += (joined.empty() ? "" : ",") + n;
    return joined;
  }

  void teardown() {
    if (worker) api.ucp_worker_destroy(worker);
    worker = nullptr;
    if (context) api.ucp_cleanup(context);
    context = nullptr;
    if (epollFd >= 0) ::close(epollFd);
    epollFd = -1;
    std::lock_guard<std::mutex> lock(mutex);
    accepting = false;
    if (wakeFd >= 0) ::close(wakeFd);
    wakeFd = -1;
  }

  void loop() {
    using Clock = std::chrono::steady_clock;
    auto lastActivity = Clock::now();
    for (;;) {
      bool stop = false;
      bool ranCommands = runCommands(stop);
      if (stop) return;
      bool moreToIssue = issue();
      unsigned progressed = 0;
      for (unsigned i = 0; i < kProgressRounds; ++i) {
        unsigned n = api.ucp_worker_progress(worker);
        progressed += n;
        if (n == 0) break;
      }
      handleFailedPeers();
      pollClosing();
      bool reported = reportTransfers();

      auto now = Clock::now();
      if (ranCommands || moreToIssue || progressed || reported) {
        lastActivity = now;
        continue;
      }
      bool inFlight = !transfers.empty() || !closing.empty();
      if (now - lastActivity < (inFlight ? kSpinWhileInFlight : kSpinWhenIdle)) continue;
      waitForEvents(inFlight ? kWaitInFlightMs : kWaitIdleMs);
      lastActivity = Clock::now();
    }
  }

  void waitForEvents(int timeoutMs) {
    ucs_status_t s = api.ucp_worker_arm(worker);
    if (s == UCS_ERR_BUSY) return;  // events arrived since the last progress: go progress them
    epoll_event events[4];
    int n = epoll_wait(epollFd, events, 4, s == UCS_OK ? timeoutMs : 1);
    for (int i = 0; i < n; ++i) {
      if (events[i].data.fd != wakeFd) continue;
      uint64_t count;
      ssize_t r = ::read(wakeFd, &count, sizeof count);
      (void)r;
    }
  }

  bool runCommands(bool& stop) {
    std::deque<std::function<void()>> batch;
    {
      std::lock_guard<std::mutex> lock(mutex);
      batch.swap(commands);
      stop = stopRequested;
    }
    if (stop) stopping = true;
    for (auto& command : batch) command();
    return !batch.empty();
  }

  void shutdown() {
    stopping = true;
    std::deque<std::function<void()>> rest;
    {
      std::lock_guard<std::mutex> lock(mutex);
      accepting = false;
      rest.swap(commands);
    }
    for (auto& command : rest) command();
    for (auto& t : transfers) {
      if (!t->reported) t->fail("the UCX backend was closed");
    }
    for (auto& entry : peers) retire(entry.second);
    peers.clear();
    reportTransfers();
    auto deadline = std::chrono::steady_clock::now() + kShutdownDrain;
    while ((!transfers.empty() || !closing.empty()) && std::chrono::steady_clock::now() < deadline) {
      api.ucp_worker_progress(worker);
      failedPeers.clear();
      pollClosing();
      reportTransfers();
    }
    failedPeers.clear();
    if (!transfers.empty() || !closing.empty()) {
      // UCX still holds requests that point at these: keep them (and their memory handles and rkeys)
      // alive for the rest of the process rather than risk a callback into freed memory.
      new std::list<std::shared_ptr<UcxTransfer>>(std::move(transfers));
      new std::vector<UcxClosingEndpoint>(std::move(closing));
    }
    regionsByBase.clear();
    regionsById.clear();
    teardown();
  }

  // ---- commands (progress thread) ----

  void startTransfer(std::shared_ptr<UcxTransfer> t) {
    transfers.push_back(t);
    if (stopping) return t->fail("the UCX backend was closed");
    auto it = peers.find(t->peerKey);
    if (it == peers.end()) return t->fail("not connected (connect() was not called, or disconnect() was)");
    UcxPeer& peer = *it->second;
    if (!peer.ep) return t->fail(peer.failure.empty() ? "not connected" : peer.failure);
    if (peer.inflight == 0 && peer.rkeys.size() >= kMaxCachedRkeys) peer.destroyRkeys();
    t->peer = it->second;
    ++peer.inflight;
    t->rkeys.assign(t->packedRkeys.size(), nullptr);
  }

  void connectPeer(const std::string& key, std::vector<uint8_t> workerAddress) {
    if (stopping) return;
    auto it = peers.find(key);
    if (it != peers.end()) {
      std::shared_ptr<UcxPeer> old = it->second;
      if (old->ep && old->address == workerAddress) return;  // same healthy endpoint
      failTransfersOf(old, "the endpoint was replaced by a new connect()");
      retire(old);
      peers.erase(it);
    }
    auto peer = std::make_shared<UcxPeer>();
    peer->api = &api;
    peer->failedPeers = &failedPeers;
    peer->key = key;
    peer->address = std::move(workerAddress);
    if (peer->address.empty()) {
      peer->failure = "could not create an endpoint: the peer's worker address is empty";
    } else {
      ucp_ep_params_t params{};
      params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                          UCP_EP_PARAM_FIELD_ERR_HANDLER;
      params.address = reinterpret_cast<const ucp_address_t*>(peer->address.data());
      params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
      params.err_handler.cb = onEndpointError;
      params.err_handler.arg = peer.get();
      ucs_status_t s = api.ucp_ep_create(worker, &params, &peer->ep);
      if (s != UCS_OK) {
        peer->ep = nullptr;
        peer->failure = "could not create an endpoint: " + describe(api, s);
      }
    }
    peers[key] = std::move(peer);
  }

  void disconnectPeer(const std::string& key) {
    auto it = peers.find(key);
    if (it == peers.end()) return;
    std::shared_ptr<UcxPeer> peer = it->second;
    peers.erase(it);
    failTransfersOf(peer, "disconnected");
    retire(peer);
  }

  std::vector<uint8_t> mapRegion(uint32_t id, void* base, size_t size) {
    if (stopping || !context) throw AgentError{"TANDEM_BACKEND_UNAVAILABLE", "the UCX backend was closed"};
    if (!base || size == 0) throw AgentError{"TANDEM_BAD_ARGUMENT", "cannot register an empty region with UCX"};
    dropRegion(id);
    ucp_mem_map_params_t params{};
    params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    params.address = base;
    params.length = size;
    ucp_mem_h memh = nullptr;
    ucs_status_t s = api.ucp_mem_map(context, &params, &memh);
    if (s != UCS_OK) {
      throw AgentError{"TANDEM_BACKEND_UNAVAILABLE", "ucp_mem_map of " + std::to_string(size) + " bytes at " +
                                                         hexAddress(base) + " failed: " + describe(api, s)};
    }
    auto region = std::make_shared<UcxRegion>();
    region->api = &api;
    region->context = context;
    region->memh = memh;
    region->id = id;
    region->base = reinterpret_cast<uintptr_t>(base);
    region->size = size;
    if (api.ucp_mem_query) {
      ucp_mem_attr_t attr{};
      attr.field_mask = UCP_MEM_ATTR_FIELD_MEM_TYPE;
      if (api.ucp_mem_query(memh, &attr) == UCS_OK) {
        region->hasMemType = true;
        region->memType = attr.mem_type;
      }
    }
    void* packed = nullptr;
    size_t packedSize = 0;
    s = api.ucp_rkey_pack(context, memh, &packed, &packedSize);
    if (s != UCS_OK) {
      throw AgentError{"TANDEM_BACKEND_UNAVAILABLE", "ucp_rkey_pack failed: " + describe(api, s)};
    }
    std::vector<uint8_t> key(static_cast<uint8_t*>(packed), static_cast<uint8_t*>(packed) + packedSize);
    api.ucp_rkey_buffer_release(packed);
    regionsById[id] = region;
    regionsByBase.emplace(region->base, region);
    return key;
  }

  void dropRegion(uint32_t id) {
    auto it = regionsById.find(id);
    if (it == regionsById.end()) return;
    auto range = regionsByBase.equal_range(it->second->base);
    for (auto r = range.first; r != range.second; ++r) {
      if (r->second == it->second) {
        regionsByBase.erase(r);
        break;
      }
    }
    regionsById.erase(it);  // unmapped now, or when the last transfer using it drains
  }

  // ---- transfers (progress thread) ----

  void failTransfersOf(const std::shared_ptr<UcxPeer>& peer, const std::string& what) {
    for (auto& t : transfers) {
      if (t->peer == peer && !t->reported) t->fail(what);
    }
  }

  // Force-closes the endpoint (pending operations complete with UCS_ERR_CANCELED). Its rkeys are
  // destroyed once the close has completed and no transfer still uses them.
  void retire(const std::shared_ptr<UcxPeer>& peer) {
    if (peer->closing) return;
    peer->closing = true;
    if (!peer->ep) return;
    ucp_request_param_t params{};
    params.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    params.flags = UCP_EP_CLOSE_FLAG_FORCE;
    void* request = api.ucp_ep_close_nbx(peer->ep, &params);
    peer->ep = nullptr;
    closing.push_back({UCS_PTR_IS_PTR(request) ? request : nullptr, peer});
  }

  void pollClosing() {
    for (auto it = closing.begin(); it != closing.end();) {
      if (it->request) {
        if (api.ucp_request_check_status(it->request) == UCS_INPROGRESS) {
          ++it;
          continue;
        }
        api.ucp_request_free(it->request);
        it->request = nullptr;
      }
      if (it->peer->inflight > 0) {
        ++it;
        continue;
      }
      it->peer->destroyRkeys();
      it = closing.erase(it);
    }
  }

  void handleFailedPeers() {
    if (failedPeers.empty()) return;
    auto failed = std::move(failedPeers);
    failedPeers.clear();
    for (auto& peer : failed) {
      failTransfersOf(peer, peer->failure);
      retire(peer);
      auto it = peers.find(peer->key);
      if (it != peers.end() && it->second == peer) {
        // Keep a record without an endpoint so that later posts fail with the reason.
        auto record = std::make_shared<UcxPeer>();
        record->api = &api;
        record->failedPeers = &failedPeers;
        record->key = peer->key;
        record->address = peer->address;
        record->failure = peer->failure;
        it->second = std::move(record);
      }
    }
  }

  // Issues pieces of started transfers (up to kIssueBudget operations), then each one's flush.
  // Returns true when pieces remain for the next round.
  bool issue() {
    size_t budget = kIssueBudget;
    bool more = false;
    for (auto& tp : transfers) {
      UcxTransfer& t = *tp;
      if (t.failed || t.flushIssued || !t.peer) continue;
      if (!t.peer->ep) {
        t.fail(t.peer->failure.empty() ? "disconnected" : t.peer->failure);
        continue;
      }
      while (t.next < t.pieces.size() && budget > 0 && !t.failed) {
        issuePiece(t, t.next++);
        --budget;
      }
      if (t.failed) continue;
      if (t.next < t.pieces.size()) {
        more = true;
        continue;
      }
      issueFlush(t);
    }
    return more;
  }

  void issuePiece(UcxTransfer& t, size_t index) {
    const UcxWorker::Piece& piece = t.pieces[index];
    if (piece.length == 0) return;
    if (piece.rkeyIndex >= t.rkeys.size()) {
      return t.fail("piece " + std::to_string(index) + " names rkey " + std::to_string(piece.rkeyIndex) +
                    " but only " + std::to_string(t.rkeys.size()) + " packed keys were given");
    }
    ucp_rkey_h& rkey = t.rkeys[piece.rkeyIndex];
    if (!rkey && !(rkey = unpackRkey(t, piece.rkeyIndex))) return;

    ucp_request_param_t params{};
    params.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    params.cb.send = onOperationDone;
    params.user_data = &t;
    if (UcxRegion* region = regionFor(t, piece.local, piece.length)) {
      // Registered already: UCX skips its own registration-cache lookup and memory-type detection.
      params.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
      params.memh = region->memh;
      if (region->hasMemType) {
        params.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMORY_TYPE;
        params.memory_type = region->memType;
      }
    }
    ucs_status_ptr_t r =
        t.write ? api.ucp_put_nbx(t.peer->ep, piece.local, piece.length, piece.remoteAddr, rkey, &params)
                : api.ucp_get_nbx(t.peer->ep, piece.local, piece.length, piece.remoteAddr, rkey, &params);
    if (r == nullptr) return;  // completed in place, no request
    if (UCS_PTR_IS_ERR(r)) {
      return t.fail(std::string(t.write ? "ucp_put_nbx" : "ucp_get_nbx") + " of piece " + std::to_string(index) +
                    ": " + describe(api, UCS_PTR_STATUS(r)));
    }
    ++t.outstanding;
  }

  void issueFlush(UcxTransfer& t) {
    t.flushIssued = true;
    ucp_request_param_t params{};
    params.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    params.cb.send = onFlushDone;
    params.user_data = &t;
    ucs_status_ptr_t r = api.ucp_ep_flush_nbx(t.peer->ep, &params);
    if (r == nullptr) return;
    if (UCS_PTR_IS_ERR(r)) return t.fail("ucp_ep_flush_nbx: " + describe(api, UCS_PTR_STATUS(r)));
    ++t.outstanding;
  }

  // The packed key's bytes identify it: unpacking is a function of (endpoint, bytes) only.
  ucp_rkey_h unpackRkey(UcxTransfer& t, uint32_t index) {
    const std::vector<uint8_t>& packed = t.packedRkeys[index];
    if (packed.empty()) {
      t.fail("packed rkey " + std::to_string(index) + " is empty");
      return nullptr;
    }
    UcxPeer& peer = *t.peer;
    std::string bytes(reinterpret_cast<const char*>(packed.data()), packed.size());
    auto it = peer.rkeys.find(bytes);
    if (it != peer.rkeys.end()) return it->second;
    ucp_rkey_h rkey = nullptr;
    ucs_status_t s = api.ucp_ep_rkey_unpack(peer.ep, packed.data(), &rkey);
    if (s != UCS_OK) {
      t.fail("ucp_ep_rkey_unpack of rkey " + std::to_string(index) + ": " + describe(api, s));
      return nullptr;
    }
    peer.rkeys.emplace(std::move(bytes), rkey);
    return rkey;
  }

  UcxRegion* regionFor(UcxTransfer& t, void* local, uint64_t length) {
    auto p = reinterpret_cast<uintptr_t>(local);
    if (t.lastRegion && t.lastRegion->covers(p, length)) return t.lastRegion;
    auto it = regionsByBase.upper_bound(p);
    for (int steps = 0; it != regionsByBase.begin() && steps < 4; ++steps) {
      --it;
      if (!it->second->covers(p, length)) continue;
      bool held = false;
      for (const auto& r : t.regions) held = held || r == it->second;
      if (!held) t.regions.push_back(it->second);
      t.lastRegion = it->second.get();
      return t.lastRegion;
    }
    return nullptr;
  }

  // Calls `done` for transfers that finished (outside any UCX callback) and forgets the drained ones.
  bool reportTransfers() {
    std::vector<std::pair<std::function<void(bool, std::string)>, std::pair<bool, std::string>>> ready;
    for (auto it = transfers.begin(); it != transfers.end();) {
      UcxTransfer& t = **it;
      if (!t.reported && (t.failed || (t.flushIssued && t.outstanding == 0))) {
        t.reported = true;
        ready.push_back({std::move(t.done), {!t.failed, t.failed ? t.error : std::string()}});
      }
      if (t.reported && t.outstanding == 0) {
        if (t.peer) --t.peer->inflight;
        it = transfers.erase(it);
      } else {
        ++it;
      }
    }
    for (auto& r : ready) {
      if (!r.first) continue;
      try {
        r.first(r.second.first, std::move(r.second.second));
      } catch (...) {
        std::fprintf(stderr, "tandem: a UCX transfer completion callback threw; ignored\n");
      }
    }
    return !ready.empty();
  }
};

UcxWorker::UcxWorker(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

std::unique_ptr<UcxWorker> UcxWorker::create(const std::vector<std::string>& candidates, std::string& reason) {
  LoadedLibrary lib = loadFirst("libucp.so.0", candidates);
  if (!lib.ok()) {
    reason = lib.reason;
    return nullptr;
  }
  auto impl = std::make_unique<Impl>();
  UcpApi& api = impl->api;
  std::string missing;
#define TANDEM_UCP_RESOLVE(name)                                         \
  api.name = reinterpret_cast<decltype(api.name)>(lib.symbol(#name));    \
  if (!api.name) missing += std::string(missing.empty() ? "" : ", ") + #name;
  TANDEM_UCP_FUNCTIONS(TANDEM_UCP_RESOLVE)
#undef TANDEM_UCP_RESOLVE
  if (!missing.empty()) {
    reason = lib.path + " lacks " + missing;
    return nullptr;
  }
  api.ucp_mem_query = reinterpret_cast<decltype(api.ucp_mem_query)>(lib.symbol("ucp_mem_query"));
  // ucs_status_string lives in libucs.so.0, which libucp loaded as a dependency: a lookup through
  // libucp's handle searches it; otherwise try the copy next to libucp.
  api.ucs_status_string = reinterpret_cast<decltype(api.ucs_status_string)>(lib.symbol("ucs_status_string"));
  if (!api.ucs_status_string) {
    std::string dir = directoryOfSymbol(reinterpret_cast<void*>(api.ucp_init_version));
    LoadedLibrary ucs = loadFirst("libucs.so.0", {dir.empty() ? "" : dir + "/libucs.so.0", "libucs.so.0"});
    api.ucs_status_string = reinterpret_cast<decltype(api.ucs_status_string)>(ucs.symbol("ucs_status_string"));
  }

  unsigned major = 0, minor = 0, release = 0;
  api.ucp_get_version(&major, &minor, &release);
  if (major != UCP_API_MAJOR || minor < UCP_API_MINOR) {
    reason = lib.path + " is UCX " + std::to_string(major) + "." + std::to_string(minor) + "." +
             std::to_string(release) + "; Tandem was built against the UCX " + std::to_string(UCP_API_MAJOR) +
             "." + std::to_string(UCP_API_MINOR) + " API and needs that version or a newer 1.x";
    return nullptr;
  }
  impl->libraryPath = lib.path;

  std::promise<std::string> ready;
  std::future<std::string> opened = ready.get_future();
  Impl* raw = impl.get();
  try {
    impl->thread = std::thread([raw, ready = std::move(ready)]() mutable { raw->run(std::move(ready)); });
  } catch (const std::system_error& e) {
    reason = std::string("could not start the UCX progress thread: ") + e.what();
    return nullptr;
  }
  std::string error = opened.get();
  if (!error.empty()) {
    impl->thread.join();
    reason = error + " (" + lib.path + ")";
    return nullptr;
  }
  return std::unique_ptr<UcxWorker>(new UcxWorker(std::move(impl)));
}

UcxWorker::~UcxWorker() {
  if (!impl_) return;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->stopRequested = true;
    if (impl_->accepting) impl_->wake();
  }
  if (impl_->onProgressThread()) {
    // Destroyed from a completion callback: the thread cannot join itself. It finishes the shutdown
    // on its own once the callback returns; its state is left to it (a deliberate, bounded leak).
    impl_->thread.detach();
    impl_.release();
    return;
  }
  impl_->thread.join();
}

std::vector<uint8_t> UcxWorker::workerAddress() const { return impl_->address; }

std::string UcxWorker::transports() const { return impl_->transports; }

std::vector<uint8_t> UcxWorker::registerMemory(uint32_t regionId, void* base, size_t size) {
  std::vector<uint8_t> packed;
  Impl* impl = impl_.get();
  if (!impl->runSync([&] { packed = impl->mapRegion(regionId, base, size); })) {
    throw AgentError{"TANDEM_BACKEND_UNAVAILABLE", "the UCX backend was closed"};
  }
  return packed;
}

void UcxWorker::deregisterMemory(uint32_t regionId) {
  Impl* impl = impl_.get();
  impl->runSync([&] { impl->dropRegion(regionId); });
}

void UcxWorker::connect(const std::string& peerKey, const std::vector<uint8_t>& workerAddress) {
  Impl* impl = impl_.get();
  impl->enqueue([impl, peerKey, address = workerAddress]() mutable { impl->connectPeer(peerKey, std::move(address)); });
}

void UcxWorker::disconnect(const std::string& peerKey) {
  Impl* impl = impl_.get();
  impl->runSync([&] { impl->disconnectPeer(peerKey); });
}

void UcxWorker::post(const std::string& peerKey, bool write, std::vector<Piece> pieces,
                      const std::vector<std::vector<uint8_t>>& packedRkeys,
                      std::function<void(bool ok, std::string error)> done) {
  auto t = std::make_shared<UcxTransfer>();
  t->api = &impl_->api;
  t->peerKey = peerKey;
  t->write = write;
  t->pieces = std::move(pieces);
  t->packedRkeys = packedRkeys;
  t->done = std::move(done);
  Impl* impl = impl_.get();
  if (!impl->enqueue([impl, t] { impl->startTransfer(t); })) {
    t->fail("the UCX backend was closed");
    if (t->done) t->done(false, t->error);
  }
}

#else  // !TANDEM_HAVE_UCX_HEADERS

struct UcxWorker::Impl {};

UcxWorker::UcxWorker(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

std::unique_ptr<UcxWorker> UcxWorker::create(const std::vector<std::string>&, std::string& reason) {
  reason = "UCX headers were not present when Tandem was built (install libucx-dev and rebuild)";
  return nullptr;
}

// No instance can exist without the headers; these only satisfy the linker.
UcxWorker::~UcxWorker() = default;
std::vector<uint8_t> UcxWorker::workerAddress() const { return {}; }
std::string UcxWorker::transports() const { return ""; }
std::vector<uint8_t> UcxWorker::registerMemory(uint32_t, void*, size_t) {
  throw AgentError{"TANDEM_BACKEND_UNAVAILABLE", "UCX headers were not present when Tandem was built"};
}
void UcxWorker::deregisterMemory(uint32_t) {}
void UcxWorker::connect(const std::string&, const std::vector<uint8_t>&) {}
void UcxWorker::disconnect(const std::string&) {}
void UcxWorker::post(const std::string&, bool, std::vector<Piece>, const std::vector<std::vector<uint8_t>>&,
                      std::function<void(bool ok, std::string error)> done) {
  if (done) done(false, "UCX headers were not present when Tandem was built");
}

#endif

}  // namespace tandem::transfer
