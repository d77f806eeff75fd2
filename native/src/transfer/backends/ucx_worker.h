// UcxWorker: one-sided RMA between processes through UCX (ucp), loaded at run time: the addon never links UCX.
// libucp.so.0 is dlopen'ed through tandem::loadFirst and every ucp_* entry point is resolved with dlsym;
// types and struct layouts come from the libucx-dev headers present at build time (UCX 1.13 API,
// requested explicitly so that a newer runtime such as 1.16 keeps the 1.13 ABI). Without those headers
// the module still builds and create() explains what is missing.
//
// Threads and ownership
//   One progress thread per backend owns the ucp context, the worker (UCS_THREAD_MODE_SINGLE), every
//   endpoint, memory handle and unpacked rkey: no UCX call is ever made from another thread. Public
//   methods hand work to it through a mutex-protected queue and an eventfd:
//     - post() and connect() only queue and return (they never wait on the thread or the network);
//     - registerMemory(), deregisterMemory() and disconnect() queue and wait for the thread to run them
//       (local work only: memory registration, endpoint close). Called from the progress thread itself
//       (i.e. from inside a `done` callback) they run inline.
//   The thread busy-polls ucp_worker_progress while work is in flight (a short spin), then sleeps in
//   epoll on the worker's event fd (UCP_FEATURE_WAKEUP + ucp_worker_arm) and the queue's eventfd.
//
// Completion rules
//   `done` runs exactly once per post, on the progress thread, never from inside a UCX callback. A WRITE
//   succeeds after every put and one ucp_ep_flush_nbx completed (data visible at the target); a READ
//   after every get and the flush completed. The first failure reports ok=false at once with text that
//   names the UCX status, e.g. "UCX WRITE of 64 pieces to peer 'decode-0' failed: endpoint failed:
//   Connection reset by remote peer (UCS_ERR_CONNECTION_RESET)". Endpoints use
//   UCP_ERR_HANDLING_MODE_PEER, so a peer process that dies fails its pending posts as soon as the
//   transport notices (socket reset, CMA ESRCH, RC retry exhaustion) or UCX keepalive does (interval
//   shortened to 2 s unless UCX_KEEPALIVE_INTERVAL is set). That mode restricts UCX to transports that
//   can detect peer failure: shared memory (posix/sysv) qualifies only with UCX_POSIX_ERROR_HANDLING=y /
//   UCX_SYSV_ERROR_HANDLING=y, so on one host UCX otherwise runs RMA over tcp/lo.
//   `done` should not destroy the backend: the thread cannot join itself, so it then finishes the
//   shutdown on its own and its bookkeeping is leaked.
//
// Memory
//   Local memory of a piece that lies inside a registered region is passed to UCX with its memory
//   handle (no per-operation registration); other local memory is registered by UCX on the fly.
//   A region must stay mapped by its owner until the posts that use it have completed. deregisterMemory()
//   never unmaps under an operation already issued: the ucp_mem_unmap waits until that post drains.
//   Peers must stop using a region's rkey before it is deregistered (on InfiniBand a remote access to an
//   unmapped key fails the peer's whole endpoint).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace tandem::transfer {

class UcxWorker {
 public:
  struct Piece {
    void* local;          // local host address
    uint64_t remoteAddr;  // address in the peer's process, inside memory covered by the rkey
    uint64_t length;      // bytes; 0 is skipped
    uint32_t rkeyIndex;   // index into post()'s packedRkeys
  };

  // Loads libucp from `candidates` (first that loads), creates a context (features RMA + WAKEUP) and one
  // worker, and starts the progress thread. On failure returns nullptr and sets `reason`.
  static std::unique_ptr<UcxWorker> create(const std::vector<std::string>& candidates, std::string& reason);

  // Fails every pending post ("the UCX backend was closed"), force-closes the endpoints, unmaps the
  // registered memory, destroys the worker and context, joins the progress thread.
  ~UcxWorker();
  UcxWorker(const UcxWorker&) = delete;
  UcxWorker& operator=(const UcxWorker&) = delete;

  std::vector<uint8_t> workerAddress() const;  // to publish in metadata (immutable, any thread)
  // Transports of the context's resources, e.g. "tcp,sysv,posix,cma" (best effort: an endpoint uses the
  // subset that reaches the peer and supports peer-failure detection).
  std::string transports() const;

  // Registers [base, base+size) for remote access (ucp_mem_map) and returns the packed remote key
  // (ucp_rkey_pack) to publish. Registering an id again replaces the earlier registration.
  // Throws AgentError{"TANDEM_BACKEND_UNAVAILABLE", ...} on failure.
  std::vector<uint8_t> registerMemory(uint32_t regionId, void* base, size_t size);
  void deregisterMemory(uint32_t regionId);  // unknown id: no-op

  // Creates (or replaces) the endpoint for a peer from its worker address. Asynchronous: an endpoint
  // that cannot be created (e.g. no common transport) makes that peer's posts fail with the reason.
  // Connecting again with the same address to a healthy endpoint keeps it (pending posts continue);
  // a different address or a failed endpoint is replaced and the old endpoint's posts fail.
  void connect(const std::string& peerKey, const std::vector<uint8_t>& workerAddress);

  // Force-closes the endpoint; its pending posts fail. Returns once that is done; unknown peer: no-op.
  void disconnect(const std::string& peerKey);

  // Starts one transfer: WRITE = put local->remote, READ = get remote->local, each piece with
  // packedRkeys[piece.rkeyIndex] (keys as the peer published them; each distinct key is unpacked once
  // per endpoint and cached). Never blocks on the network. `done` is called exactly once from the
  // progress thread, except when post() races with destruction: then it is called before post returns.
  void post(const std::string& peerKey, bool write, std::vector<Piece> pieces,
            const std::vector<std::vector<uint8_t>>& packedRkeys,
            std::function<void(bool ok, std::string error)> done);

 private:
  struct Impl;
  explicit UcxWorker(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tandem::transfer
